"""``StreamingDataset``: a rank's batches from a tokenfeed server as a PyTorch IterableDataset."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import mmap
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.context import get_spawning_popen
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from client.ahead import Ahead, Pacer, Paced
from client.batch import DEFAULT_FIELDS, FIELDS, lazy_batch, to_batch
from client.discovery import Replica, Replicas
from client.plan import Edit, Plan
from client.state import Identity, Position, make_state, parse_state
from client.transport import Backoff, Channel, Tls, is_loopback, make_ring, stream_batches
from tokenfeed import malloc, wire
from tokenfeed.v1 import tokenfeed_pb2 as pb

__all__ = ["DEFAULT_FIELDS", "FIELDS", "DatasetInfo", "StreamingDataset", "default_batches_per_message", "to_batch"]

#: What ``StreamingDataset.describe()`` returns: the server's description of a dataset (name, vocab_size,
#: eos_id, pad_id, tokenizer, num_shards, total_tokens, fingerprint, sources, ...).
DatasetInfo = pb.DatasetInfo

#: The largest answer ``tokenizer_files()`` accepts (a large vocabulary's tokenizer.json is about 10 MB).
TOKENIZER_MESSAGE_BYTES = 256 << 20

#: Key under which each batch carries its state when iterated by a ``StreamingDataLoader``.
STATE_KEY = "_tokenfeed_state"
#: Key of a message still in its wire form: a worker of a ``StreamingDataLoader`` sends each
#: message's uint16 rows as one item (one storage to share per message instead of four int64 ones
#: per batch), with the state after each of its batches; the loader expands and interleaves them.
RAW_KEY = "_tokenfeed_raw"


#: Why ``state_dict()`` refuses in the main process of a plain ``DataLoader`` with workers.
STALE_STATE = (
    "StreamingDataset.state_dict() was called in the main process, but this dataset is iterated in "
    "DataLoader worker processes: each worker iterates its own copy, so this object's position never "
    "advanced and a checkpoint of it would replay the batches already trained on. Take the state from "
    "the loader instead, which is exact per batch with any num_workers: "
    "client.StreamingDataLoader(dataset, num_workers=N).state_dict(), or torchdata's "
    "StatefulDataLoader(dataset, batch_size=None, num_workers=N).state_dict()."
)


class _WorkerUse:
    """Whether a dataset is iterated in DataLoader worker processes, as its main process can know.

    A plain ``DataLoader`` never calls the dataset in the main process, so the evidence comes from
    the workers' side: a forked worker sets a byte of memory it shares with its parent; a worker
    started by spawn or forkserver gets a pickled copy, so pickling for a new process marks it.
    """

    def __init__(self, used: bool = False) -> None:
        self._shared = _shared_byte(used)

    def mark(self) -> None:
        self._shared[0] = 1

    def __bool__(self) -> bool:
        return bool(self._shared[0])

    def __getstate__(self) -> dict[str, bool]:
        if get_spawning_popen() is not None:  # pickled to start a process (a DataLoader worker)
            self.mark()
        return {"used": bool(self)}

    def __setstate__(self, state: dict[str, bool]) -> None:
        self._shared = _shared_byte(state["used"])  # a copy's own mark (a mapping cannot be pickled)


def _shared_byte(value: bool) -> mmap.mmap:
    """One byte of anonymous ``MAP_SHARED`` memory: a forked child's writes reach its parent."""
    byte = mmap.mmap(-1, 1)
    byte[0] = int(value)
    return byte


#: Batches in flight per message round of a whole job (one message per rank), through the
#: shared-memory ring and through gRPC: a message is a few hundred bytes of gRPC through the ring,
#: so larger messages only spread the per-message cost wider (64 gave 25% more tokens/s at 35% less
#: trainer CPU per token than 16, issue 9); inline tokens are protobuf bytes, copied per message.
RING_MESSAGE_BATCHES, WIRE_MESSAGE_BATCHES = 64, 16
#: Tokens per message at most (ring: 4 MiB slots at the widest dtype; gRPC: 512 KiB of uint16).
RING_MESSAGE_TOKENS, WIRE_MESSAGE_TOKENS = 1 << 20, 1 << 18


#: Ranks of a job that may all get the transport's largest messages; beyond, the ceiling shrinks.
PACED_RANKS = 16


def default_batches_per_message(batch_tokens: int, shared_memory: bool, world_size: int) -> int:
    """Batches per message when the caller names none, a ceiling the server sizes each message
    under (``StreamRequest.batches_adaptive``, ``server.serve.pacing``): as many as the transport
    carries cheaply (``RING_*`` through shared memory, ``WIRE_*`` inline), shared among the ranks
    of a job of more than ``PACED_RANKS`` (which bounds what the server holds for its streams).
    The server sends fewer while many streams share it: a rank waits a round of the server's loop
    between two messages, and large messages make the round long (64 ranks at a fixed 16 batches
    had a p99 gap of 258 ms, at 1 batch 40 ms but a tenth of one stream's tokens/s)."""
    batches, tokens = (RING_MESSAGE_BATCHES, RING_MESSAGE_TOKENS) if shared_memory else (
        WIRE_MESSAGE_BATCHES, WIRE_MESSAGE_TOKENS)
    return max(1, min(batches, batches * PACED_RANKS // max(1, world_size), tokens // max(1, batch_tokens)))


def _default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class StreamingDataset(IterableDataset[dict[str, Any]]):
    """The batches of one rank, streamed from a tokenfeed server.

    Yields dicts of tensors ``[batch_size, seq_len]``: ``input_ids``, ``labels`` (the next token,
    -100 on padding) and ``position_ids`` (restarting at each document), plus ``cu_seqlens``
    (int32 start offsets of the documents in the flattened batch, then its size: the layout of
    flash-attention's varlen kernels). The sequence is
    infinite: epoch after epoch, each reshuffled by ``seed`` and the epoch number.

    Rank ``r`` of ``W`` gets global batches ``r, r+W, r+2W, ...``; inside a
    ``DataLoader(ds, batch_size=None, num_workers=N)`` each worker opens its own stream and the
    loader yields exactly the rank's sequence.

    Resuming: ``state_dict()`` records what the trainer consumed (not what was prefetched) and
    ``load_state_dict()`` continues at the exact next batch. Use ``StreamingDataLoader`` (or
    torchdata's ``StatefulDataLoader``) and take the loader's state to get exact states with
    ``num_workers > 0``: the dataset's own ``state_dict()`` raises in the main process once
    workers iterate it (they advance their copies, not this object). Every
    rank's state carries the job's position, the first row of the next step, so after a resize
    every new rank can load any old rank's state (rank 0's, say) at a step boundary and the job
    continues in global order with nothing lost or repeated.

    Args:
        address: ``host:port`` of a server, or a list of replicas (rank ``r`` uses ``r % len``), or
            ``dns:///name:port`` (a Kubernetes headless Service, say): the addresses the name
            resolves to, sorted, are the replicas. A plain ``name:port`` that resolves to several
            addresses is expanded the same way. A replica that keeps failing for
            ``failover_s`` is left: the name is resolved again and the stream resumes from its
            cursor on the next replica.
        dataset: name of a dataset the server serves.
        seq_len: tokens per row.
        batch_size: rows per batch.
        seed: seeds the global order.
        rank, world_size: default to ``torch.distributed``, else ``RANK``/``WORLD_SIZE``, else 0/1.
        packing: ``"concat"`` (documents back to back, split across rows), ``"bfd"`` (whole
            documents best-fit into rows, longer ones split, rest PAD) or ``"pad"`` (one document
            per row, truncated to ``seq_len``).
        reconnect_deadline_s: how long to keep reconnecting after the server went away.
        failover_s: how long a replica may keep failing before the stream moves to the next one
            (when there are several, or a name to resolve again); a rolling restart costs a rank about
            this much data-wait per replica it was on.
        batches_per_message: batches the server packs into one message; the state stays exact
            per batch whatever it is. Default (None): at most 64 through the shared-memory ring,
            16 inline, about 1 M / 256 K tokens, less for a job of more than 16 ranks
            (``default_batches_per_message``), and the server sends fewer while many streams
            share it, keeping each rank's wait between messages short (``server.serve.pacing``).
            A number given here is exact.
        compression: ``"zstd"`` to compress tokens on the wire (pays off only on slow links).
        decode_ahead: messages turned into tensors ahead of the trainer, in a background thread,
            so that ``next`` finds the batch ready while the training step runs; 0 decodes in the
            consumer's thread when each batch is asked for. Default (None): in the consumer's
            thread while it asks for batches back to back (no step to hide decoding behind), and
            2 ahead from when its steps average 2 ms or more. Decoding in the consumer's thread
            makes each field when it is first read (``client.batch.LazyBatch``): fields a
            trainer never reads cost nothing.
        max_tokens: token-budget batches: each batch is one row of ``max_tokens`` tokens holding
            whole document pieces (documents split at ``seq_len``); each step takes the next
            pieces of the global order and balances them across ranks by longest-processing-time,
            so every rank gets nearly the same number of tokens. ``batch_size`` is unused. The
            last token of a piece cut mid-document is labelled -100: what follows it in the row
            is another piece.
        provenance: add ``batch["provenance"]``, int64 ``[n, 7]``: for every piece of every row,
            (row, column, length, source, shard, document, offset in document); ``source`` indexes
            ``describe().sources`` and ``shard`` ``describe().shards`` of that source's dataset, so
            a loss spike can be traced to the exact documents.
        token: bearer token for a server that requires one; default: ``$TOKENFEED_TOKEN``.
        tls_ca: PEM CA bundle that signed the server's certificate: connect with TLS.
        tls_cert, tls_key: PEM client certificate and key, for a server that requires mutual TLS.
        shared_memory: offer the server a ring in shared memory (``/dev/shm``, or
            ``$TOKENFEED_SHM_DIR``) for the tokens, so that gRPC carries only the small rest of each
            message: a server on this host writes the tokens there, one elsewhere ignores the offer.
            Default (None): offered when ``address`` is a loopback address. Not with
            ``compression`` or ``max_tokens``.
    """

    def __init__(self, address: str | Sequence[str], dataset: str, seq_len: int = 2048, batch_size: int = 8,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, *,
                 packing: str = wire.DEFAULT_PACKING, max_tokens: int | None = None, provenance: bool = False,
                 reconnect_deadline_s: float = 60.0, failover_s: float = 1.0, batches_per_message: int | None = None,
                 compression: str | None = None, decode_ahead: int | None = None, token: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 shared_memory: bool | None = None, fields: Sequence[str] = DEFAULT_FIELDS) -> None:
        super().__init__()
        default_rank, default_world = _default_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if packing not in wire.PACKINGS:
            raise ValueError(f"packing must be one of {wire.PACKINGS}, got {packing!r}")
        if max_tokens is not None:
            if max_tokens < seq_len:
                raise ValueError(f"max_tokens ({max_tokens}) must be at least seq_len ({seq_len}), "
                                 "the longest document piece")
            if packing not in (wire.DEFAULT_PACKING, "split"):
                raise ValueError(f"max_tokens batches are made of document pieces; packing={packing!r} does not apply")
            packing = "split"
        if isinstance(fields, str) or not fields or not set(fields) <= set(FIELDS):
            unknown = sorted(set([fields] if isinstance(fields, str) else fields) - set(FIELDS))
            raise ValueError(f"fields must be a non-empty sequence of {FIELDS}, got {fields!r}"
                             + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        self.fields = tuple(f for f in FIELDS if f in fields)  # one order, whatever was asked
        if compression not in (None, "none", "zstd"):
            raise ValueError(f"compression must be None or 'zstd', got {compression!r}")
        self._replicas = Replicas(address, self.rank)
        self.address = self._replicas.current.target
        self.identity = Identity(dataset=dataset, seed=seed, seq_len=seq_len, packing=packing)
        self.batch_size = batch_size
        self.max_tokens = max_tokens or 0
        self.provenance = provenance
        if failover_s < 0:
            raise ValueError(f"failover_s must be 0 or more seconds, got {failover_s}")
        self.backoff = Backoff(deadline_s=reconnect_deadline_s, failover_s=failover_s)
        if shared_memory is None:
            shared_memory = is_loopback(self._replicas.current.target)
        self.shared_memory = shared_memory and compression in (None, "none") and not max_tokens
        self.batches_adaptive = batches_per_message is None and not max_tokens  # a ceiling for the server
        if batches_per_message is None:
            batches_per_message = default_batches_per_message(max_tokens or batch_size * seq_len, self.shared_memory,
                                                              self.world_size)
        elif batches_per_message < 1:
            raise ValueError(f"batches_per_message must be 1 or more (or None: chosen), got {batches_per_message}")
        self.batches_per_message = batches_per_message
        self.compression = pb.COMPRESSION_ZSTD if compression == "zstd" else pb.COMPRESSION_NONE
        if decode_ahead is not None and decode_ahead < 0:
            raise ValueError(f"decode_ahead must be 0 or more (or None: when the steps leave time), got {decode_ahead}")
        self.decode_ahead = decode_ahead
        row_tokens = max_tokens + 1 if max_tokens else batch_size * (seq_len + 1)
        max_message = batches_per_message * row_tokens * 4 + (1 << 20)
        if provenance:  # worst case as the server bounds it: 2-token documents, a 56-byte record each
            max_message += batches_per_message * (row_tokens // 2 + batch_size) * 56
        if max_tokens:  # a varint piece start per piece (the server's bound)
            max_message += batches_per_message * 5 * row_tokens
        token = token if token is not None else os.environ.get("TOKENFEED_TOKEN") or None
        # (a stream whose messages come through its ring's FIFO needs the channel's thread: it
        # notices the call failing while the stream waits on the FIFO, see transport._piped)
        self._connect = functools.partial(Channel, max_message_bytes=max(max_message, 4 << 20), token=token,
                                          tls=Tls.load(tls_ca, tls_cert, tls_key),
                                          read_on_caller=not decode_ahead and not self.shared_memory)
        self._channel = self._channel_to(self._replicas.current)
        # Slots sized for 4-byte tokens (the dtype is the server's to choose): eight messages ahead
        # (four ran ~10% slower, the server waiting on a full ring), at most 8 MiB a stream. No
        # deeper: small batches would put a thousand batches in flight, past any need.
        self._slot_bytes = batches_per_message * row_tokens * 4
        self._slots = max(2, min(8, (8 << 20) // self._slot_bytes))
        self._position = Position()
        self._cursor: pb.Cursor | None = None  # the last yielded batch's cursor, not yet a Position
        self._steps = 0
        self._cycle = 0
        self._plan = Plan()
        self._per_worker_state = False  # a state loaded inside a DataLoader worker (StatefulDataLoader)
        self._attach_state = False      # set by StreamingDataLoader: each batch carries its state
        self._in_workers = _WorkerUse()  # iterated by DataLoader workers: this object's state is stale

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch this dataset yielded (a small JSON-able dict).

        Raises ``RuntimeError`` in the main process once DataLoader workers iterate this dataset:
        they advance their own copies, never this one, so its state would silently replay data.
        ``StreamingDataLoader.state_dict()`` (or torchdata's ``StatefulDataLoader``) is exact."""
        if self._in_workers and get_worker_info() is None:
            raise RuntimeError(STALE_STATE)
        return self._state()

    def _state(self) -> dict[str, Any]:
        """``state_dict()`` without the check: for the process that iterates (or a loader that
        knows this object's position is current, as before its first batch)."""
        return make_state(self.identity, self._current(), rank=self.rank, world_size=self.world_size,
                          batch_size=self.batch_size, steps=self._steps, cycle=self._cycle, plan=self._plan)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batch at which ``state`` was taken; raises ``ValueError`` for a state
        of another dataset, seed, seq_len or packing, or a damaged one. A state of another rank or
        world size is an elastic resume: this rank continues from the job's position."""
        pos, meta, self._plan = parse_state(state, self.identity)
        self._position, self._cursor, self._steps = pos, None, meta["steps"]
        self._per_worker_state = get_worker_info() is not None
        self._cycle = meta["worker_cycle"] if self._per_worker_state else 0

    # ---- the data plan ---------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        """The data plan: its edits before ``steps_read`` are in the position, the rest are pending."""
        return self._plan

    @property
    def steps_read(self) -> int:
        """Global steps this job has read (one batch per rank each): where a new edit can take effect."""
        return self._steps

    def skip_steps(self, n: int, at_step: int | None = None) -> None:
        """Pass over ``n`` global steps of data from ``at_step`` (default: the next step): the job's
        step ``t >= at_step`` reads what step ``t + n`` would have read. Each rank passes over its
        own share, so the ranks stay aligned; the skip is part of ``state_dict()`` from now on and
        takes effect from the next ``iter()``."""
        self.apply(Edit.skip(self._steps if at_step is None else at_step, n))

    def apply(self, edit: Edit) -> None:
        """Add ``edit`` to the data plan (from the next ``iter()``). Raises ``ValueError`` for an edit
        at a step the job has already read, and ``RuntimeError`` where this object's position is
        stale (DataLoader workers iterate it: apply it to the ``StreamingDataLoader``)."""
        if self._in_workers and get_worker_info() is None:
            raise RuntimeError(STALE_STATE)
        self._plan = self._plan.apply(self._checked(edit), self._steps)

    def _checked(self, edit: Edit) -> Edit:
        """``edit`` with what this client can check checked; the server checks ids it alone knows."""
        components = self._current().components
        if edit.op == "weights" and components:
            names = [c[0] for c in components]
            unknown = sorted(set(dict(edit.weights)) - set(names))
            if unknown:
                raise ValueError(f"weights for {', '.join(map(repr, unknown))}: not in the mixture "
                                 f"{self.identity.dataset!r} (its components: {', '.join(names)})")
        if edit.op == "exclude" and not edit.dataset:  # the job's own dataset
            edit = dataclasses.replace(edit, dataset=self.identity.dataset)
        return edit

    def _current(self) -> Position:
        if self._cursor is not None:
            self._position, self._cursor = Position.from_cursor(self._cursor), None
        return self._position

    # ---- iteration ---------------------------------------------------------------------
    def _channel_to(self, replica: Replica) -> Channel:
        return self._connect(replica.target, server_name=replica.host)

    def _fail_over(self) -> Channel | None:
        """A channel to the next live replica (the address resolved again), or None if there is none."""
        replica = self._replicas.fail_over()
        if replica is None:
            return None
        self._channel.close()
        self._channel, self.address = self._channel_to(replica), replica.target
        return self._channel

    def close(self) -> None:
        """Close this process's channel (a later iteration opens a new one)."""
        self._channel.close()

    def describe(self, timeout: float = 30.0) -> DatasetInfo:
        """The server's description of this dataset (vocabulary size, EOS/PAD ids, shards); waits up
        to ``timeout`` seconds for the server to answer."""
        return self._channel.describe(self.identity.dataset, timeout=timeout).datasets[0]

    def tokenizer_files(self, timeout: float = 60.0) -> dict[str, bytes]:
        """The files of the tokenizer this dataset's ids come from (name -> contents; none for the byte
        tokenizer), to keep with a model trained on it. One call on a channel of its own, whose
        message limit fits a large tokenizer.json (the batch channel's is sized for batches)."""
        replica = self._replicas.current
        channel = self._connect(replica.target, server_name=replica.host, max_message_bytes=TOKENIZER_MESSAGE_BYTES)
        try:
            info = channel.describe(self.identity.dataset, timeout=timeout, tokenizer_files=True).datasets[0]
        finally:
            channel.close()
        return {f.name: f.data for f in info.tokenizer_files}

    def describe_server(self, timeout: float = 30.0) -> pb.DescribeResponse:
        """The server's whole answer about this dataset: its description (``datasets[0]``) and the
        ``server_version`` (recorded by trainers with their checkpoints)."""
        return self._channel.describe(self.identity.dataset, timeout=timeout)

    def _request(self, cursor: pb.Cursor | None, first_step: int, worker: int) -> pb.StreamRequest:
        ident = self.identity
        req = pb.StreamRequest(
            dataset=ident.dataset, seed=ident.seed, seq_len=ident.seq_len, batch_size=self.batch_size,
            packing=ident.packing, rank=self.rank, world_size=self.world_size, first_step=first_step,
            step_stride=self._stride, batches_per_message=self.batches_per_message,
            compression=self.compression, worker_id=worker, provenance=self.provenance,
            max_tokens=self.max_tokens, batches_adaptive=self.batches_adaptive)
        if cursor is not None:
            req.cursor.CopyFrom(cursor)
        return req

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None:  # tell the main process (a forked worker shares the mark with it)
            self._in_workers.mark()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        base_cycle = self._cycle if self._per_worker_state else 0
        first = (worker - base_cycle) % workers
        start, steps0 = self._current(), self._steps
        self._stride = workers
        # fix the job rows of pending exclude/weights edits (this job's world size decides them)
        self._plan = self._plan.resolve(steps0, start.row, self.world_size * self.batch_size)
        segments = self._plan.segments(steps0)
        if len(segments) > 1 or segments[0].offset or segments[0].edits:
            self._check_can_skip(workers, moves=len(segments) > 1 or bool(segments[0].offset))
        raw = self._attach_state and info is not None  # a StreamingDataLoader worker: wire form
        malloc.tune_for_client()
        # ``cursor`` lies before job step ``after`` and includes the plan's first ``offset`` skipped steps
        cursor, after, offset = start.to_cursor(self.identity), steps0, 0
        t = steps0 + first  # this worker's next job step
        for seg in segments:
            if seg.end is not None and t >= seg.end:
                continue  # none of this worker's steps lie in it
            count = None if seg.end is None else -(-(seg.end - t) // workers)
            skip_rows = (seg.offset - offset) * self.world_size * self.batch_size
            edits = [_plan_edit(e) for e in seg.edits]
            for item, cursors in self._segment(cursor, t - after, skip_rows, count, worker, raw, edits):
                states = []
                for c in cursors:  # the rank's batch at job step t was taken
                    self._cursor, self._steps, self._cycle = c, t + 1, base_cycle + t - steps0 + 1
                    cursor, after, t = c, t + 1, t + workers
                    if raw or self._attach_state:
                        states.append(self._state())
                if raw:  # one item per message; the loader yields its batches with these states
                    yield {RAW_KEY: {**item, "states": states}}
                    continue
                if states:
                    item[STATE_KEY] = states[0]
                yield item
            offset = seg.offset

    def _check_can_skip(self, workers: int, moves: bool) -> None:
        """Refuse a plan's edits where the stream cannot honour them, naming why (``moves``: a skip
        or an edit ahead: the streams end and reopen at its step)."""
        if self.max_tokens:
            raise ValueError("data plan edits are not supported with token-budget batches (max_tokens) yet")
        if moves and workers > 1 and not self._attach_state:
            raise ValueError("a data plan with pending edits needs client.StreamingDataLoader (or num_workers=0 "
                             "or 1): a plain DataLoader's round robin over workers cannot follow an edit ahead")

    def _segment(self, cursor: pb.Cursor | None, first_step: int, skip_rows: int, count: int | None,
                 worker: int, raw: bool, edits: Sequence[pb.PlanEdit] = ()) -> Iterator[Any]:
        """One run of the plan, streamed from ``cursor`` with ``skip_rows`` passed over before
        ``first_step``: ``(batch, [cursor])`` per batch, or for ``raw`` ``(message, cursors)`` per
        message; at most ``count`` batches in all (a message the run ends inside is cut)."""
        def request(c: pb.Cursor | None, step: int) -> pb.StreamRequest:
            req = self._request(c, step, worker)
            req.plan.extend(edits)
            if c is cursor:  # a reconnect from a later batch's cursor already lies past the skipped rows
                req.skip_rows = skip_rows
            return req
        chunks = stream_batches(
            self._channel, request, cursor, first_step, self._stride, self.backoff,
            ring_from=functools.partial(make_ring, self._slots, self._slot_bytes) if self.shared_memory else None,
            fail_over=self._fail_over)
        # Ahead of the consumer, a message's batches are made together; in step with it, each
        # batch when it is asked for (fewer live tensors: a smaller working set), each field of it
        # when it is read.
        mode = _Decode(ahead=bool(self.decode_ahead), lazy=len(self.fields) > 1)
        source = _decoded(chunks, raw, self.provenance, self.fields, mode, plan_edits=len(edits),
                          address=self.address)
        name = f"{threading.current_thread().name}/tokenfeed-decode"
        pacer = Pacer() if self.decode_ahead is None else None
        messages: Any = source
        if self.decode_ahead:  # decode in a thread, overlapping the training step
            messages = iter(Ahead(source, self.decode_ahead, interrupt=chunks.close, name=name))
        elif pacer is not None:  # in this thread until the consumer's steps leave time to hide it behind
            messages = iter(Paced(source, pacer, AUTO_DECODE_AHEAD, mode.go_ahead, interrupt=chunks.close, name=name))
        expected = None
        if skip_rows:
            expected = (cursor.row if cursor else 0) + skip_rows + (first_step + 1) * self.world_size * self.batch_size
        units = (((b, [c]) for b, c in m) for m in messages) if not raw else ([m] for m in messages)
        try:
            for item, cursors in itertools.chain.from_iterable(units):
                if expected is not None:  # an old server ignores skip_rows: its cursor would not lie past them
                    _check_skipped(cursors[0], expected, self.address)
                    expected = None
                if count is not None:
                    cursors = cursors[:count]  # the run may end inside a message
                    count -= len(cursors)
                if pacer is None:
                    yield item, cursors
                else:
                    handed = time.perf_counter()
                    yield item, cursors
                    pacer.stepped(time.perf_counter() - handed)  # the consumer's step
                if count == 0:
                    return  # never pull the next batch: it belongs to the next run
        finally:
            messages.close()
            chunks.close()


def _plan_edit(e: Edit) -> pb.PlanEdit:
    """An exclude or weights edit as a stream carries it (its job row fixed)."""
    assert e.row is not None, "resolved before streaming"
    return pb.PlanEdit(op=e.op, from_row=e.row, at_step=e.at_step, dataset=e.dataset, shard=max(e.shard, 0),
                       document=e.document, weights=dict(e.weights))


def _check_skipped(first: pb.Cursor, expected: int, address: str) -> None:
    if first.row != expected:
        raise RuntimeError(f"the tokenfeed server at {address} did not pass over the data plan's skipped rows "
                           f"(the batch's cursor is at row {first.row}, not {expected}): it predates data plans "
                           "(StreamRequest.skip_rows); upgrade it")


#: Messages decoded ahead once ``decode_ahead=None`` finds steps to hide decoding behind.
AUTO_DECODE_AHEAD = 2


@dataclass
class _Decode:
    """How messages are decoded: ``ahead`` (in a thread: every field of a message's batches at
    once), else batch by batch as asked for, each field when first read where ``lazy``."""

    ahead: bool
    lazy: bool

    def go_ahead(self) -> None:
        self.ahead = True


def _decoded(chunks: Iterator[tuple[pb.BatchChunk, int]], raw: bool, provenance: bool,
             fields: tuple[str, ...] = DEFAULT_FIELDS, mode: _Decode | None = None, plan_edits: int = 0,
             address: str = "") -> Iterator[Any]:
    """Per message: its batches as tensors and the cursor after each (a list when ``mode.ahead``,
    else made one by one as they are iterated); for ``raw``, the message in wire form (one uint16
    tensor of all its batches) and the cursors. ``mode`` is read per message (it may change).
    Each message must say the server applied the request's ``plan_edits`` data-plan edits."""
    mode = mode or _Decode(ahead=True, lazy=False)
    for chunk, i in chunks:
        if i != 0:
            continue
        if chunk.plan_edits != plan_edits:
            raise RuntimeError(f"the tokenfeed server at {address} did not apply the data plan's {plan_edits} "
                               "exclude/weights edit(s): it predates them (StreamRequest.plan); upgrade it")
        tokens = wire.decode_chunk(chunk)
        records = wire.decode_provenance(chunk) if provenance else None
        piece_starts = wire.decode_piece_starts(chunk)
        if raw:
            yield ({"tokens": torch.from_numpy(tokens.copy()), "eos_id": chunk.eos_id, "pad_id": chunk.pad_id,
                    "piece_starts": piece_starts, "fields": fields,
                    "provenance": [torch.from_numpy(r.copy()) for r in records] if records is not None else None},
                   list(chunk.cursors))
        else:
            lazy = mode.lazy and not mode.ahead
            batches = _batches_of(chunk, tokens, records, piece_starts, fields, lazy)
            yield list(batches) if mode.ahead else batches
        for _ in range(chunk.num_batches - 1):  # the stream's (chunk, i) for the other batches
            next(chunks)


def _batches_of(chunk: pb.BatchChunk, tokens: np.ndarray, records: list[np.ndarray] | None,
                piece_starts: list[list[int]] | None, fields: tuple[str, ...],
                lazy: bool = False) -> Iterator[tuple[dict[str, torch.Tensor], pb.Cursor]]:
    """The chunk's batches; ``lazy``: each field made when first read, from a copy of the rows
    (``tokens`` may be a shared-memory slot, reused once the stream moves past the chunk)."""
    eos_id, pad_id, cursors = chunk.eos_id, chunk.pad_id, chunk.cursors  # (read once: a header's fields
    for i in range(chunk.num_batches):                                     # are not free to read)
        starts = piece_starts[i] if piece_starts else None
        batch = (lazy_batch(tokens[i].copy(), eos_id, pad_id, starts, fields) if lazy
                 else to_batch(tokens[i], eos_id, pad_id, starts, fields))
        if records is not None:
            batch["provenance"] = torch.from_numpy(records[i].copy())
        yield batch, cursors[i]


def expand_raw(bundle: dict[str, Any], j: int) -> dict[str, torch.Tensor]:
    """Batch ``j`` of a message in wire form (``RAW_KEY``) as the tensors ``to_batch`` makes."""
    starts = bundle["piece_starts"]
    batch = to_batch(bundle["tokens"][j].numpy(), bundle["eos_id"], bundle["pad_id"], starts[j] if starts else None,
                     bundle["fields"])
    if bundle["provenance"] is not None:
        batch["provenance"] = bundle["provenance"][j]
    return batch
