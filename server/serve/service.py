"""The gRPC adapter: validate, call the stream logic, map domain errors to status codes."""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Mapping

import grpc
from google.protobuf.message import Message

from server import metrics
from server.config import ServerSettings
from server.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, TokenfeedError, Unavailable
from server.serve.drive import Buffers, stream_chunks
from server.serve.limits import Admission, Overloaded, ShuttingDown, check_request
from server.serve.pacing import Pacing
from server.serve.protocol import (MessageBuffers, dataset_info, encode_chunk, fixed_fields, parse_request,
                                   tokenizer_files)
from server.serve.ring import RingWriter, send_piped
from server.stages.served import Served
from server.stream.params import StreamParams
from server.supply.store import ShardStore
from tokenfeed import shm, wire
from tokenfeed.shm import RingBroken, ServerPipe, ServerRing
from tokenfeed.v1 import tokenfeed_pb2 as pb
from tokenfeed.v1 import tokenfeed_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVER_VERSION = "0.1.0"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TokenFeed"].full_name

_STATUS = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DataLoss: grpc.StatusCode.DATA_LOSS,
}


def status_of(err: TokenfeedError) -> grpc.StatusCode:
    """The one place that maps domain errors to gRPC status codes."""
    for kind, code in _STATUS.items():
        if isinstance(err, kind):
            return code
    return grpc.StatusCode.INTERNAL


class TokenFeedService(pb_grpc.TokenFeedServicer):
    """Serves ``StreamBatches`` and ``Describe`` for a set of datasets."""

    def __init__(self, datasets: Mapping[str, Served], store: ShardStore,
                 settings: ServerSettings) -> None:
        self.datasets, self.store, self.settings = datasets, store, settings
        self.admission = Admission(settings.max_streams, int(settings.stream_memory_bytes))
        # batches a message, for the streams that let the server choose
        self.pacing = Pacing(settings.paced_gap_s, min_tokens=settings.paced_min_tokens)
        store.job_starting = self.pacing.job_starting  # (packing ahead on the loop only once none is)
        self.plan_edits: Counter[str] = Counter()  # data plan edits the open streams carry, by kind

    def _count_edits(self, kinds: tuple[str, ...], sign: int) -> None:
        for kind in kinds:
            self.plan_edits[kind] += sign
            metrics.PLAN_EDITS.labels(kind).inc(sign)

    async def StreamBatches(self, request: pb.StreamRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        ticket = ring = pipe = None  # the admission slot, the ring and its FIFO, released however the stream ends
        paced = served = False  # counted among the streams sharing the loop (``Pacing``); its first message out
        edits: tuple[str, ...] = ()
        try:
            params = parse_request(request, self.datasets, self.settings)
            ticket = self.admission.admit(check_request(params, self.settings))
            edits = params.plan_edits
            self._count_edits(edits, +1)
            ring = self._ring(request, params)
            pipe = self._pipe(request, ring)
            if pipe is not None:  # the messages go through it: the client reads it, not the call
                await context.send_initial_metadata(((shm.PIPE_KEY, "1"),))
            log.info("stream opened: %s rank %d/%d worker %d from %s (row %d%s)", request.dataset,
                     request.rank, request.world_size, request.worker_id, context.peer(), params.start.row,
                     ", tokens through shared memory" + (", messages through its FIFO" if pipe is not None else "")
                     if ring is not None else "")
            self.pacing.opened()
            paced = True
            with metrics.StreamMeter(params.dataset.name, params.packing, params.dataset.info.pad_id) as meter:
                buffers: Buffers = (RingWriter(ring, lambda: self.admission.draining) if ring is not None
                                    else MessageBuffers())
                fixed = fixed_fields(params)
                async for chunk in stream_chunks(params, self.store, buffers, self.pacing):
                    if params.zstd:  # ~4 s per GiB: never on the loop
                        message, payload_bytes = await asyncio.to_thread(encode_chunk, chunk, params, fixed)
                    else:
                        message, payload_bytes = encode_chunk(chunk, params, fixed)
                    meter.sent(chunk.tokens, payload_bytes)
                    self.pacing.sent()
                    if not served:
                        self.pacing.served()
                        served = True
                    if chunk.shm_slot is not None:  # the tokens into the ring before the message naming their slot
                        assert ring is not None
                        ring.write(chunk.shm_slot, chunk.tokens.data)
                        meter.shared(payload_bytes)
                    if pipe is None:
                        yield message
                    elif await send_piped(pipe, message):
                        await asyncio.sleep(0)  # the other streams' turn, as a gRPC send gives them
                    else:  # the client closed its end: it is gone (its call's cancellation follows)
                        return
                    meter.resumed()
                    if self.admission.draining:  # shutdown: this message was the stream's last
                        raise ShuttingDown()
        except TokenfeedError as err:
            retry = ((wire.RETRY_AFTER_KEY, "250"),) if isinstance(err, Overloaded) else ()
            await context.abort(status_of(err), str(err), trailing_metadata=retry)
        except RingBroken as err:  # this client broke its own ring: its stream ends, no other
            log.warning("stream for %s rank %d from %s ended: %s", request.dataset, request.rank, context.peer(), err)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err),
                                trailing_metadata=((shm.BROKEN_KEY, "1"),))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as err:  # a bug must not take the server down; the client gets a reason
            log.exception("stream for %s rank %d failed", request.dataset, request.rank)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}")
        finally:
            if paced:
                self.pacing.closed(served)
            self._count_edits(edits, -1)
            if ticket is not None:
                ticket.release()
            if pipe is not None:  # (before the status goes out: the client reads the FIFO to its end first)
                pipe.close()
            if ring is not None:
                ring.close()

    def _pipe(self, request: pb.StreamRequest, ring: ServerRing | None) -> ServerPipe | None:
        """The FIFO the client offers beside its ring, if this server can write into it (else
        messages go over gRPC)."""
        if ring is None or not request.shared_memory.pipe:
            return None
        try:
            return ServerPipe.attach(request.shared_memory)
        except ValueError as err:
            raise InvalidArgument("shared_memory.pipe", str(err)) from None
        except OSError as err:
            log.debug("the FIFO offered by rank %d is not usable here (%s); messages go over gRPC", request.rank, err)
            return None

    def _ring(self, request: pb.StreamRequest, params: StreamParams) -> ServerRing | None:
        """The shared-memory ring the client offers, if this server can write into it; a ring this
        server cannot open (another host, another directory, another user's file) means tokens go
        inline."""
        if not request.HasField("shared_memory") or not self.settings.shared_memory or params.max_tokens:
            return None
        need = params.batches_per_message * params.batch_size * (params.seq_len + 1) * params.dataset.dtype.itemsize
        if request.shared_memory.slot_bytes < need:
            raise InvalidArgument("shared_memory", f"slots of {request.shared_memory.slot_bytes} bytes cannot hold "
                                  f"a message of {need} bytes")
        directory = os.path.abspath(self.settings.shared_memory_dir or shm.default_dir())
        try:
            return ServerRing.attach(request.shared_memory, directory)
        except ValueError as err:
            raise InvalidArgument("shared_memory", str(err)) from None
        except OSError as err:
            log.debug("shared memory offered by rank %d not usable here (%s); tokens go inline", request.rank, err)
            return None

    async def Describe(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext) -> pb.DescribeResponse:
        if request.dataset and request.dataset not in self.datasets:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown dataset {request.dataset!r}; "
                                f"this server serves: {', '.join(sorted(self.datasets))}")
        names = [request.dataset] if request.dataset else sorted(self.datasets)
        infos = [dataset_info(self.datasets[name], self.settings) for name in names]
        if request.tokenizer_files:
            if not request.dataset:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "tokenizer_files: name one dataset")
            try:
                files = await asyncio.to_thread(tokenizer_files, self.datasets[request.dataset], self.settings)
            except (TokenfeedError, OSError) as err:
                code = status_of(err) if isinstance(err, TokenfeedError) else grpc.StatusCode.UNAVAILABLE
                await context.abort(code, f"tokenizer_files: {err}")
            else:
                infos[0].tokenizer_files.extend(files)
        return pb.DescribeResponse(datasets=infos, server_version=SERVER_VERSION,
                                   plan_edits={k: n for k, n in self.plan_edits.items() if n > 0})


def _serialize(message: bytes | Message) -> bytes:
    """Responses that are already bytes (``encode_chunk``) pass through."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_to_server(service: TokenFeedService, server: grpc.aio.Server) -> None:
    """Register the service, as the generated ``add_TokenFeedServicer_to_server`` does, but with
    a serializer that passes pre-encoded ``BatchChunk`` bytes through."""
    handlers = {
        "StreamBatches": grpc.unary_stream_rpc_method_handler(
            service.StreamBatches, request_deserializer=pb.StreamRequest.FromString, response_serializer=_serialize),
        "Describe": grpc.unary_unary_rpc_method_handler(
            service.Describe, request_deserializer=pb.DescribeRequest.FromString, response_serializer=_serialize),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
