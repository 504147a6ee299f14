"""The trainer's data: the server check, a rank's training loader, the eval set, batch hashes."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Generator, Iterator
from typing import NamedTuple, cast

import torch

from client import DatasetInfo, RequestError, StreamingDataLoader, StreamingDataset, TokenfeedError
from trainer.config import ConfigError, TrainConfig


class DataUnavailable(ConnectionError):
    """The tokenfeed server could not be reached; the message names its address."""


def _dataset(cfg: TrainConfig, name: str, seed: int, rank: int, world_size: int) -> StreamingDataset:
    d = cfg.data
    return StreamingDataset(d.address, dataset=name, seq_len=d.seq_len, batch_size=d.batch_size, seed=seed,
                            rank=rank, world_size=world_size, packing=d.packing,
                            reconnect_deadline_s=d.reconnect_deadline_s,
                            fields=("input_ids", "labels", "position_ids"))  # what the loop uses


class Described(NamedTuple):
    """The server's answer about the training dataset."""

    info: DatasetInfo
    server_version: str


def describe(cfg: TrainConfig, rank: int, world_size: int) -> Described:
    """Ask the server about the training (and eval) dataset; fail fast, naming the address.

    Raises:
        DataUnavailable: no answer within ``data.reconnect_deadline_s``.
        ConfigError: the server does not serve the dataset or refuses the stream's shape.
    """
    info: Described | None = None
    for field, name, seed in (("data.dataset", cfg.data.dataset, cfg.seed),
                              ("eval.dataset", cfg.eval_dataset, cfg.eval_seed)):
        ds = _dataset(cfg, name, seed, rank, world_size)
        try:
            answer = ds.describe_server(timeout=cfg.data.reconnect_deadline_s)
        except RequestError as err:
            raise ConfigError(f"{field}={name!r}: {err}") from None
        except TokenfeedError as err:
            raise DataUnavailable(
                f"cannot reach the tokenfeed server at {ds.address} (data.address) within "
                f"data.reconnect_deadline_s={cfg.data.reconnect_deadline_s:g}s: {err}") from None
        got = answer.datasets[0]
        for limit, value, setting in ((got.max_seq_len, cfg.data.seq_len, "data.seq_len"),
                                      (got.max_batch_size, cfg.data.batch_size, "data.batch_size")):
            if limit and value > limit:
                raise ConfigError(f"{setting}={value} exceeds the server's limit {limit} for dataset {name!r}")
        info = info or Described(got, answer.server_version)
    assert info is not None
    return info


def tokenizer_files(cfg: TrainConfig) -> dict[str, bytes]:
    """The files of the training dataset's tokenizer, as the server sends them (none for the byte tokenizer).

    Raises:
        DataUnavailable: no answer within ``data.reconnect_deadline_s``.
    """
    ds = _dataset(cfg, cfg.data.dataset, cfg.seed, 0, 1)
    try:
        return ds.tokenizer_files(timeout=cfg.data.reconnect_deadline_s)
    except TokenfeedError as err:
        raise DataUnavailable(f"cannot fetch the tokenizer of {cfg.data.dataset!r} from the tokenfeed server at "
                              f"{ds.address} (data.address): {err}") from None
    finally:
        ds.close()


def train_loader(cfg: TrainConfig, rank: int, world_size: int) -> StreamingDataLoader:
    """This rank's training batches (global batches ``rank, rank + W, ...``), resumable per rank."""
    ds = _dataset(cfg, cfg.data.dataset, cfg.seed, rank, world_size)
    return StreamingDataLoader(ds, num_workers=cfg.data.num_workers)


def eval_batches(cfg: TrainConfig, rank: int, world_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of the eval set: the held-out stream's first ``eval.batches`` global batches.

    Every rank yields the same number of batches (FSDP runs collectives in each forward); a batch
    past the end of the eval set has all labels -100, so it weighs nothing. The set is therefore
    identical for every world size.
    """
    per_rank = math.ceil(cfg.eval.batches / world_size)
    stream = cast(Generator[dict[str, torch.Tensor], None, None],
                  iter(_dataset(cfg, cfg.eval_dataset, cfg.eval_seed, rank, world_size)))
    try:
        for k in range(per_rank):
            batch = next(stream)
            if rank + k * world_size >= cfg.eval.batches:
                batch["labels"] = torch.full_like(batch["labels"], -100)
            yield batch
    finally:
        stream.close()  # cancels the gRPC stream


def batch_hash(input_ids: torch.Tensor) -> int:
    """A 48-bit fingerprint of a batch's token ids (exact in a float64, so it can ride a collective)."""
    data = input_ids.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=6).digest(), "big")
