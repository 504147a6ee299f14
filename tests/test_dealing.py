"""Contracts 2-4 through a real server: global order, dealing to ranks and workers, rows."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from client import StreamingDataLoader, StreamingDataset
from client.dataset import DEFAULT_FIELDS
from client.loader import fork_safe_context
from tests.conftest import decode_rows, jsonl_config

SEQ, BATCH = 128, 4


def rank_batches(address: str, world: int, rank: int, workers: int, n: int, batch: int = BATCH, **kw) -> list[dict]:
    ds = StreamingDataset(address, "docs", seq_len=SEQ, batch_size=batch, seed=7, rank=rank, world_size=world, **kw)
    # a plain DataLoader; forkserver because this test process holds live gRPC channels, and
    # forking a process with threads inside gRPC can deadlock the child (see README)
    loader = DataLoader(ds, batch_size=None, num_workers=workers,
                        multiprocessing_context=fork_safe_context() if workers else None)
    return list(itertools.islice(loader, n))


def global_rows(address: str, world: int, workers: int, global_batches: int, batch: int = BATCH) -> np.ndarray:
    """Interleave the ranks' batches by contract 3: global batch b is rank b % W's (b // W)-th."""
    per_rank = [rank_batches(address, world, r, workers, -(-global_batches // world), batch) for r in range(world)]
    ordered = [per_rank[b % world][b // world]["input_ids"] for b in range(global_batches)]
    return torch.cat(ordered).numpy()


@pytest.mark.parametrize("workers", [0, 2])
def test_two_epochs_every_document_once_whatever_the_world_size(start_server, corpus, workers):
    path, docs = corpus
    server = start_server(jsonl_config(path, shard_bytes=32 << 10))
    shards = StreamingDataset(server.address, "docs", seq_len=SEQ, batch_size=BATCH).describe().num_shards
    tokens = sum(len(d.encode()) + 1 for d in docs)
    rows_needed = 2 * (tokens // SEQ + shards + 1)
    # (batches of 16 rows: a DataLoader worker hands over each batch's tensors through shared memory,
    # about 4 ms a batch here, whatever its size)
    batches = -(-rows_needed // 16)
    sequences = {w: global_rows(server.address, w, workers, batches, 16) for w in (1, 2, 3)}
    for w in (2, 3):  # contract 2: the global sequence does not depend on the world size
        np.testing.assert_array_equal(sequences[w], sequences[1])
    decoded = decode_rows(sequences[1])
    assert len(decoded) >= 2 * len(docs)
    epoch0, epoch1 = decoded[: len(docs)], decoded[len(docs) : 2 * len(docs)]
    assert Counter(epoch0) == Counter(docs)
    assert Counter(epoch1) == Counter(docs)
    assert epoch0 != epoch1  # reshuffled by seed and epoch


def test_ranks_get_disjoint_batches_and_seeds_differ(start_server, corpus):
    path, _ = corpus
    server = start_server(jsonl_config(path))
    a, b = (rank_batches(server.address, 2, r, 0, 5) for r in (0, 1))
    for x, y in zip(a, b):
        assert not torch.equal(x["input_ids"], y["input_ids"])
    other_seed = StreamingDataset(server.address, "docs", seq_len=SEQ, batch_size=BATCH, seed=8, rank=0, world_size=2)
    first = next(iter(other_seed))
    assert not torch.equal(first["input_ids"], a[0]["input_ids"])


def test_rows_labels_and_positions(start_server, corpus):
    path, _ = corpus
    server = start_server(jsonl_config(path))
    ds = StreamingDataset(server.address, "docs", seq_len=SEQ, batch_size=BATCH)
    batches = list(itertools.islice(ds, 200))
    for batch in batches:
        assert set(batch) >= {"input_ids", "labels", "position_ids", "cu_seqlens"}
        for key in ("input_ids", "labels", "position_ids"):
            assert batch[key].shape == (BATCH, SEQ) and batch[key].dtype == torch.int64
        starts = (batch["position_ids"].reshape(-1) == 0).nonzero().reshape(-1)
        assert batch["cu_seqlens"].tolist() == starts.tolist() + [BATCH * SEQ]
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    pos = torch.cat([b["position_ids"] for b in batches])
    # labels are the next token of the stream: inside a row, and across rows into the next row
    stream = ids.reshape(-1)
    nxt = torch.cat([stream[1:], torch.tensor([-1])]).reshape(ids.shape)
    real = labels != -100
    real[-1, -1] = False  # its next token is in a batch not collected here
    assert torch.equal(labels[real], nxt[real])
    assert torch.equal(labels[:-1, -1][real[:-1, -1]], ids[1:, 0][real[:-1, -1]])
    # -100 exactly where the next token is PAD
    in_row = torch.where(ids[:, 1:] == 257, -100, ids[:, 1:])
    assert torch.equal(labels[:, :-1], in_row)  # -100 exactly where the next token is PAD
    assert ids.eq(257).any(), "a shard end pads its last row"
    # position ids restart at 0 at each row start and right after each EOS, and count up otherwise
    assert torch.all(pos[:, 0] == 0)
    after_eos = ids[:, :-1] == 256
    assert torch.all(pos[:, 1:][after_eos] == 0)
    assert torch.all(pos[:, 1:][~after_eos] == pos[:, :-1][~after_eos] + 1)
    assert ids.max() <= 257 and ids.min() >= 0


@pytest.mark.parametrize("workers", [0, 2])
def test_fields_choose_the_tensors_and_change_nothing_else(start_server, corpus, workers):
    """``fields=("tokens",)`` is the rows as packed (the peers' int64 [B, seq_len + 1] tensor),
    ``("input_ids", "labels")`` leaves the positions out: the same batches, cursors and states."""
    path, _ = corpus
    server = start_server(jsonl_config(path))

    def run(fields):
        ds = StreamingDataset(server.address, "docs", seq_len=SEQ, batch_size=BATCH, seed=5, fields=fields)
        loader = StreamingDataLoader(ds, num_workers=workers)
        out = []
        for batch in itertools.islice(loader, 30):
            out.append((batch, loader.state_dict()))
        return out

    full, tokens, pair = run(DEFAULT_FIELDS), run(["tokens"]), run(("labels", "input_ids"))
    for (f, fs), (t, ts), (p, ps) in zip(full, tokens, pair, strict=True):
        assert set(t) == {"tokens"} and set(p) == {"input_ids", "labels"}
        assert t["tokens"].shape == (BATCH, SEQ + 1) and t["tokens"].dtype == torch.int64
        assert torch.equal(t["tokens"][:, :-1], f["input_ids"])
        real = f["labels"] != -100
        assert torch.equal(t["tokens"][:, 1:][real], f["labels"][real])
        assert torch.all(t["tokens"][:, 1:][~real] == 257)  # PAD left in place
        assert torch.equal(p["input_ids"], f["input_ids"]) and torch.equal(p["labels"], f["labels"])
        assert fs == ts == ps
    # a state saved with one set of fields resumes a dataset with another
    resumed = StreamingDataset(server.address, "docs", seq_len=SEQ, batch_size=BATCH, seed=5, fields=["tokens"])
    resumed.load_state_dict(full[9][1])
    assert torch.equal(next(iter(resumed))["tokens"][:, :-1], full[10][0]["input_ids"])


@pytest.mark.parametrize("fields", [[], "tokens", ["input_ids", "attention_mask"]])
def test_fields_refuse_what_they_cannot_make(fields):
    with pytest.raises(ValueError, match="fields must be") as err:
        StreamingDataset("127.0.0.1:1", "docs", fields=fields)
    if fields and not isinstance(fields, str):
        assert "unknown: attention_mask" in str(err.value)


def test_packing_efficiency_on_stdlib_corpus(start_server):
    server = start_server(None)  # the embedded default dataset: the stdlib sources
    seq, batch = 2048, 8
    ds = StreamingDataset(server.address, "stdlib", seq_len=seq, batch_size=batch)
    info = ds.describe()
    total_bytes = sum(s.bytes for s in info.shards)
    rows_bound = total_bytes * 1.2 // seq + info.num_shards  # byte tokens + EOS per doc
    batches = list(itertools.islice(ds, int(rows_bound // batch) + 1))
    info = ds.describe()  # every shard has been tokenized now
    assert all(s.tokens > 0 for s in info.shards)
    rows_epoch = sum(-(-s.tokens // seq) for s in info.shards)
    ids = torch.cat([b["input_ids"] for b in batches])[:rows_epoch]
    real = int(ids.ne(257).sum())
    assert real == info.tokens
    efficiency = real / ids.numel()
    assert efficiency >= 0.99, efficiency
    docs = decode_rows(ids.numpy())
    assert len(docs) == info.documents


@pytest.mark.parametrize("packing", ["bfd", "pad"])
def test_whole_document_packings_deliver_every_document_once_per_epoch(start_server, corpus, packing):
    path, docs = corpus
    server = start_server(jsonl_config(path, shard_bytes=32 << 10))
    seq = 8192  # longer than any document: bfd splits none, pad truncates none
    per_rank = [StreamingDataset(server.address, "docs", seq_len=seq, batch_size=2, seed=1, rank=r,
                                 world_size=2, packing=packing) for r in range(2)]
    iters = [iter(ds) for ds in per_rank]
    decoded: list[str] = []
    rows = []
    while len(decoded) < 2 * len(docs):
        for it in iters:  # contract 3: global batches alternate between the two ranks
            batch = next(it)["input_ids"]
            rows.append(batch)
            decoded += decode_rows(batch.numpy())
            if packing == "pad":
                assert torch.all((batch != 257).sum(dim=1) >= 1)
                assert all(len(decode_rows(row[None].numpy())) == 1 for row in batch)
    assert Counter(decoded[: len(docs)]) == Counter(docs)
    assert Counter(decoded[len(docs) : 2 * len(docs)]) == Counter(docs)
    assert decoded[: len(docs)] != decoded[len(docs) : 2 * len(docs)]


@pytest.mark.parametrize("world, rank", [(3, 1), (16, 5)])
def test_messages_spanning_many_shards_hold_the_same_batches_and_positions(start_server, corpus, world, rank):
    """A message of 16 batches spans several small shards (and epoch ends), and with 16 ranks
    each step skips whole shards: the server's fast path assembles and skips across shards once
    their rows are known; it must give exactly the batches and the positions after each batch
    that one batch per message gives."""
    path, docs = corpus
    server = start_server(jsonl_config(path, shard_bytes=4 << 10))
    shards = StreamingDataset(server.address, "docs", seq_len=SEQ, batch_size=BATCH).describe().num_shards
    tokens = sum(len(d.encode()) + 1 for d in docs)
    n = 3 * -(-(tokens // SEQ + shards) // (world * BATCH))  # about three epochs of one rank

    def run(per_message: int) -> tuple[list[np.ndarray], list[dict]]:
        ds = StreamingDataset(server.address, "docs", seq_len=SEQ, batch_size=BATCH, seed=3, rank=rank,
                              world_size=world, batches_per_message=per_message)
        ids, positions = [], []
        for batch in itertools.islice(ds, n):
            ids.append(batch["input_ids"].numpy())
            positions.append(ds.state_dict()["position"])
        return ids, positions

    one_ids, one_pos = run(1)
    many_ids, many_pos = run(16)
    assert shards >= 8 and one_pos[-1]["epoch"] >= 2
    assert many_pos == one_pos
    for a, b in zip(many_ids, one_ids):
        np.testing.assert_array_equal(a, b)
