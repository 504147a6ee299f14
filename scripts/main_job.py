"""The README's main job: a server on the embedded stdlib corpus feeding a client for a while."""

from __future__ import annotations

import argparse
import time

from benchmarks.common import Server
from client import StreamingDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with Server() as server:
        print(f"data server on {server.address}, dataset 'stdlib'")
        ds = StreamingDataset(server.address, "stdlib", seq_len=2048, batch_size=8)
        start = last_report = time.perf_counter()
        tokens = 0
        for batch in ds:
            tokens += batch["input_ids"].numel()
            now = time.perf_counter()
            if now - last_report >= 1.0:
                print(f"{now - start:5.1f}s  {tokens / (now - start) / 1e6:7.1f} M tokens/s  cursor row "
                      f"{ds.state_dict()['position']['row']}")
                last_report = now
            if now - start >= args.seconds:
                break


if __name__ == "__main__":
    main()
