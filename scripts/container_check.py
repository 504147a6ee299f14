"""Host side of scripts/container_test.sh: writes the mounted config, corpus and TLS material, and
checks the running container from outside (a real client through the published port, /metrics).

    python scripts/container_check.py fixtures DIR
    python scripts/container_check.py stream DIR GRPC_PORT
    python scripts/container_check.py metrics DIR METRICS_PORT
    python scripts/container_check.py hold DIR GRPC_PORT     (one batch, then the stream stays open)
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the repository's client, tests/certs.py

TOKEN = "container-test-token"
DATASET = "docs"
SEQ_LEN, BATCH_SIZE, BATCHES = 64, 4, 12
EOS, PAD = 256, 257  # the byte tokenizer's specials (DESIGN.md contract 1)

# Paths as the container sees them: DIR/config is mounted on /config, DIR/data on /data.
SERVER_YAML = """\
server:
  auth_tokens_file: /config/tokens.txt
  tls_cert: /config/tls/server_cert.pem
  tls_key: /config/tls/server_key.pem
  data_roots: [/data]
  shutdown_grace_s: 5
cache:
  max_bytes: 64MiB
  disk: {path: /cache/shards, max_bytes: 256MiB}
datasets:
  docs:
    source: {type: jsonl, paths: ["/data/**/*.jsonl"], text_field: text}
    tokenizer: {type: byte}
"""


def documents() -> list[str]:
    """A corpus with text no stdlib file holds, so a batch proves it came from the mounted data."""
    return [f"tokenfeed container corpus document {i}: " + " ".join(f"w{i}x{j}" for j in range(40 + i % 17))
            for i in range(200)]


def fixtures(directory: Path) -> None:
    """DIR/config (server.yaml, tokens.txt, tls/*.pem) and DIR/data (two JSONL shards), readable by the
    image's non-root user (uid 10001): a private key mode 0600 of root would not be."""
    from certs import write_pki

    config, data = directory / "config", directory / "data" / "part"
    data.mkdir(parents=True)
    (config / "tls").mkdir(parents=True)
    (config / "server.yaml").write_text(SERVER_YAML)
    (config / "tokens.txt").write_text(f"{TOKEN} {DATASET}\n")
    write_pki(config / "tls")
    docs = documents()
    for shard in range(2):
        with (data / f"shard-{shard}.jsonl").open("w") as f:
            for text in docs[shard::2]:
                f.write(json.dumps({"text": text}) + "\n")
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def pieces(row: list[int]) -> list[str]:
    """The document fragments of one packed row: text between EOS/PAD tokens."""
    out, current = [], bytearray()
    for token in row:
        if token in (EOS, PAD):
            out.append(current.decode("utf-8", errors="strict"))
            current = bytearray()
        else:
            current.append(token)
    out.append(current.decode("utf-8", errors="ignore"))  # a row may end inside a multi-byte character
    return [p for p in out if p]


def read_batches(directory: Path, port: int, token: str) -> list[list[list[int]]]:
    from client import StreamingDataset

    dataset = StreamingDataset(f"127.0.0.1:{port}", DATASET, seq_len=SEQ_LEN, batch_size=BATCH_SIZE, token=token,
                               tls_ca=str(directory / "config" / "tls" / "ca.pem"), reconnect_deadline_s=20)
    batches = []
    for batch in dataset:
        batches.append(batch["input_ids"].tolist())
        if len(batches) == BATCHES:
            return batches
    raise AssertionError(f"the stream ended after {len(batches)} batches")


def stream(directory: Path, port: int) -> None:
    """Batches through the published port with TLS and the token: shape, content from the mounted
    corpus, the same batches on a second read (a fixed seed); a wrong token is refused."""
    batches = read_batches(directory, port, TOKEN)
    corpus = "\n".join(documents())
    for batch in batches:
        assert len(batch) == BATCH_SIZE and all(len(row) == SEQ_LEN for row in batch), "wrong batch shape"
        for row in batch:
            for piece in pieces(row):
                assert piece in corpus, f"a batch holds text that is not in the mounted corpus: {piece[:60]!r}"
    assert read_batches(directory, port, TOKEN) == batches, "a second read of the same seed differs"
    try:
        read_batches(directory, port, "wrong-token")
    except Exception as err:  # noqa: BLE001 -- the client's typed error; its text names the status
        assert "UNAUTHENTICATED" in str(err) or "token" in str(err).lower(), f"unexpected refusal: {err!r}"
    else:
        raise AssertionError("a wrong token streamed batches")
    print(f"stream: {len(batches)} batches of {BATCH_SIZE}x{SEQ_LEN} over TLS with a token; wrong token refused")


def metrics(port: int) -> None:
    """/metrics answers in Prometheus text and counts the batches the client received."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    series = f'tokenfeed_sent_batches_total{{dataset="{DATASET}"}}'
    sent = [line for line in text.splitlines() if line.startswith(series)]
    assert sent and float(sent[0].split()[-1]) >= 2 * BATCHES, f"no batches counted in /metrics: {sent}"
    print(f"metrics: {sent[0]}")


def hold(directory: Path, port: int) -> None:
    """Opens a stream, takes one batch and then holds the stream open unread (the server blocks on flow
    control) until stdin closes: the in-flight stream a SIGTERM must drain within the grace period."""
    from client import StreamingDataset

    dataset = StreamingDataset(f"127.0.0.1:{port}", DATASET, seq_len=SEQ_LEN, batch_size=BATCH_SIZE, token=TOKEN,
                               tls_ca=str(directory / "config" / "tls" / "ca.pem"), reconnect_deadline_s=1)
    batches = iter(dataset)
    next(batches)
    print("streaming", flush=True)
    sys.stdin.read()


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("fixtures", "stream", "metrics", "hold"):
        print(__doc__, file=sys.stderr)
        return 2
    directory = Path(argv[1])
    if argv[0] == "fixtures":
        fixtures(directory)
    elif argv[0] == "stream":
        stream(directory, int(argv[2]))
    elif argv[0] == "hold":
        hold(directory, int(argv[2]))
    else:
        metrics(int(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
