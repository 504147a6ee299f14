"""One stream from a cursor, reopened with jittered exponential backoff when the server goes away."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from client.errors import ServerUnavailable, from_rpc_error
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: Codes after which the stream is reopened from the cursor (the server went away or restarted).
#: A server bug (UNKNOWN, INTERNAL) is raised at once rather than retried until the deadline.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}


@dataclass(frozen=True)
class Backoff:
    """Reconnect policy: full-jitter exponential backoff, bounded by a total deadline."""

    initial_s: float = 0.05
    max_s: float = 2.0
    deadline_s: float = 60.0

    def delays(self) -> Iterator[float]:
        """Sleep times until the deadline runs out."""
        start, delay = time.monotonic(), self.initial_s
        while (left := self.deadline_s - (time.monotonic() - start)) > 0:
            yield min(random.uniform(0, delay), left)
            delay = min(delay * 2, self.max_s)


class Channel:
    """A gRPC channel created lazily in the process that uses it (gRPC is not fork-safe)."""

    def __init__(self, address: str, max_message_bytes: int) -> None:
        self.address = address
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", 4 << 20)]
        self._pid: int | None = None
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.TokenFeedStub | None = None

    @property
    def stub(self) -> pb_grpc.TokenFeedStub:
        if self._pid != os.getpid():  # new process (or first use): never reuse a forked channel
            self._channel = grpc.insecure_channel(self.address, options=self._options)
            self._stub = pb_grpc.TokenFeedStub(self._channel)
            self._pid = os.getpid()
        assert self._stub is not None
        return self._stub

    def close(self) -> None:
        if self._channel is not None and self._pid == os.getpid():
            self._channel.close()
        self._channel = self._stub = self._pid = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": None, "_channel": None, "_stub": None}

    def describe(self, dataset: str = "", timeout: float = 30.0) -> pb.DescribeResponse:
        try:
            return self.stub.Describe(pb.DescribeRequest(dataset=dataset), timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.address) from None


def stream_batches(channel: Channel, request_from: Callable[[pb.Cursor | None, int], pb.StreamRequest],
                   cursor: pb.Cursor | None, first_step: int, stride: int,
                   backoff: Backoff) -> Iterator[tuple[pb.BatchChunk, int]]:
    """Yield ``(chunk, i)`` for every batch ``i`` of every chunk, reopening after a failure at
    the position after the last yielded batch (its cursor, then the rank's next step)."""
    delays: Iterator[float] | None = None
    while True:
        call = channel.stub.StreamBatches(request_from(cursor, first_step))
        try:
            for chunk in call:
                delays = None
                for i in range(chunk.num_batches):
                    yield chunk, i
                    cursor, first_step = chunk.cursors[i], stride - 1
        except grpc.RpcError as err:
            if err.code() not in RETRYABLE:
                raise from_rpc_error(err, channel.address) from None
            delays = delays or backoff.delays()
            delay = next(delays, None)
            if delay is None:
                raise ServerUnavailable(
                    f"tokenfeed server {channel.address} unreachable for {backoff.deadline_s:.0f}s: "
                    f"{err.code().name}: {err.details()}", code=err.code(), details=err.details() or "",
                ) from None
            log.warning("stream from %s broke (%s: %s); reconnecting in %.2fs", channel.address,
                        err.code().name, err.details(), delay)
            time.sleep(delay)
        finally:
            call.cancel()
