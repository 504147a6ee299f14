"""The gRPC interceptor that counts and times every RPC (``tokenfeed_rpc_*``)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import grpc

from server.metrics import RPC_HANDLED, RPC_SECONDS, RPC_STARTED


def _code_name(context: grpc.aio.ServicerContext, err: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if err is None:
        return "OK"
    # A client that goes away cancels the handler task or closes the response generator.
    return "CANCELLED" if isinstance(err, (GeneratorExit, asyncio.CancelledError)) else "UNKNOWN"


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts RPCs by service, method and status code and times them. Labels come only from
    registered handlers (unknown methods are counted as ``unknown``), so cardinality is bounded."""

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            RPC_HANDLED.labels("unknown", "unknown", "UNIMPLEMENTED").inc()
            return None
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        return _instrumented(handler, service or "unknown", method or "unknown")


def _instrumented(handler: grpc.RpcMethodHandler, service: str, method: str) -> grpc.RpcMethodHandler:
    started, seconds = RPC_STARTED.labels(service, method), RPC_SECONDS.labels(service, method)

    def finish(context: grpc.aio.ServicerContext, t0: float, err: BaseException | None) -> None:
        seconds.observe(time.perf_counter() - t0)
        RPC_HANDLED.labels(service, method, _code_name(context, err)).inc()

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(fn):
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started.inc()
                t0, err = time.perf_counter(), None
                try:
                    async for response in fn(request, context):
                        yield response
                except BaseException as e:
                    err = e
                    raise
                finally:
                    finish(context, t0, err)
            return stream
        if inspect.iscoroutinefunction(fn):
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started.inc()
                t0, err = time.perf_counter(), None
                try:
                    return await fn(request, context)
                except BaseException as e:
                    err = e
                    raise
                finally:
                    finish(context, t0, err)
            return call
        return fn  # a synchronous handler: left alone (this server has none)

    kinds = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for kind, make in kinds.items():
        fn = getattr(handler, kind)
        if fn is not None:
            return make(wrap(fn), request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler
