"""Mixture metrics: a real server with two text datasets and a mixture of them, /metrics on, a real
client streaming the mixture; the mixture's series are checked against what the client consumed.

Before the fix, a mixture with ``--metrics-port`` crashed the server at start
(``'Mixture' object has no attribute 'config'``), and the mixture gauges were never set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from conftest import make_documents
from test_metrics import metrics_url, poll, scrape, settled, value

SEQ, BATCH, WEIGHTS = 64, 8, {"web": 0.75, "books": 0.25}


def text_corpus(path: Path, prefix: str, seed: int, files: int = 3) -> str:
    """Plain text files of documents split by a blank-line delimiter; returns the glob."""
    path.mkdir(parents=True)
    docs = [f"{prefix}:{d}" for d in make_documents(60, seed=seed, max_len=800)]
    for i in range(files):
        (path / f"part-{i}.txt").write_text("\n\n".join(docs[i::files]))
    return str(path / "*.txt")


def mixture_config(root: Path) -> dict[str, Any]:
    datasets: dict[str, Any] = {
        name: {"source": {"type": "text", "paths": [text_corpus(root / name, name, seed)], "delimiter": "\n\n",
                          "shard_bytes": 4096}}
        for name, seed in (("web", 1), ("books", 2))}
    datasets["mix"] = {"mixture": dict(WEIGHTS)}
    return {"datasets": datasets}


def components_of(batches: list[dict]) -> np.ndarray:
    """The mixture component (0 = web, 1 = books) of every row, from the client's provenance."""
    out = []
    for b in batches:
        per_row: dict[int, int] = {}
        for row, src in b["provenance"].numpy()[:, [0, 3]].tolist():
            assert per_row.setdefault(row, src) == src, "a row mixes components"
        out += [per_row[r] for r in range(b["input_ids"].shape[0])]
    return np.array(out)


def take(ds: Any, n: int) -> list[dict]:
    out = []
    for batch in ds:
        out.append(batch)
        if len(out) == n:
            break
    ds.close()
    return out


def test_mixture_series_match_what_the_client_streamed(start_server, tmp_path):
    from client import StreamingDataset

    server = start_server(mixture_config(tmp_path), extra_args=["--metrics-port", "0"])
    url = metrics_url(server)

    before = scrape(url)
    for name, weight in WEIGHTS.items():  # the configured weights, before any stream
        assert value(before, "tokenfeed_mixture_weight", dataset="mix", source=name) == weight
        assert ("tokenfeed_mixture_rows_total", frozenset({("dataset", "mix"), ("source", name)})) in before
        assert value(before, "tokenfeed_mixture_rows_total", dataset="mix", source=name) == 0
    assert ("tokenfeed_active_streams", frozenset({("dataset", "mix")})) in before
    assert value(before, "tokenfeed_dataset_shards", dataset="mix") == \
        value(before, "tokenfeed_dataset_shards", dataset="web") + value(before, "tokenfeed_dataset_shards",
                                                                          dataset="books") > 2
    # a mixture has no source of its own: its components' shards are read and counted under their names
    assert not any(dict(labels).get("dataset") == "mix" for name, labels in before
                   if name.startswith(("tokenfeed_tokenized_shards", "tokenfeed_bad_records")))

    ds = StreamingDataset(server.address, "mix", seq_len=SEQ, batch_size=BATCH, seed=3, provenance=True)
    stream = iter(ds)
    consumed = components_of([next(stream) for _ in range(12)])

    def snapshot() -> dict[str, float] | None:
        """Rows per component once every row the server took was sent (none is half-assembled:
        the server runs ahead of the client until flow control stops it)."""
        s = scrape(url)
        rows = {name: value(s, "tokenfeed_mixture_rows_total", dataset="mix", source=name) for name in WEIGHTS}
        return rows if sum(rows.values()) == value(s, "tokenfeed_sent_rows_total", dataset="mix") else None

    rows = poll(snapshot)
    ds.close()
    total = int(sum(rows.values()))
    assert total >= len(consumed) == 12 * BATCH and total % BATCH == 0
    # Ground truth: the first `total` rows of the same (deterministic) stream, counted by component
    # on the client side, are exactly what the server counted per component.
    replay = components_of(take(StreamingDataset(server.address, "mix", seq_len=SEQ, batch_size=BATCH, seed=3,
                                                 provenance=True), total // BATCH))
    np.testing.assert_array_equal(replay[: len(consumed)], consumed)
    assert [rows["web"], rows["books"]] == np.bincount(replay, minlength=2).tolist()
    assert abs(rows["web"] - WEIGHTS["web"] * total) <= 1  # largest-deficit: within a row of the target
    assert rows["books"] > 0
    final = settled(url, 2)  # both streams ended: nothing moves any more
    described = {s.name: s.rows_served for s in ds.describe().sources}
    assert described == {name: value(final, "tokenfeed_mixture_rows_total", dataset="mix", source=name)
                         for name in WEIGHTS}
    for name, weight in WEIGHTS.items():
        assert value(final, "tokenfeed_mixture_weight", dataset="mix", source=name) == weight
    # the components' own datasets were not streamed: no rows sent under their names
    assert value(final, "tokenfeed_sent_rows_total", dataset="web") == 0
    assert value(final, "tokenfeed_tokenized_shards_total", dataset="web") > 0
