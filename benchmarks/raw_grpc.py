"""The transport's ceiling: raw bytes over a gRPC server stream on loopback, no protobuf work.

``python -m benchmarks.raw_grpc serve`` runs the server (prints its port); ``measure()`` reads from it.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import grpc

METHOD = "/raw.Raw/Stream"


async def _serve() -> None:
    async def stream(request: bytes, context: grpc.aio.ServicerContext):
        size, count = (int(x) for x in request.decode().split(","))
        payload = bytes(size)
        for _ in range(count):
            yield payload

    handler = grpc.method_handlers_generic_handler("raw.Raw", {
        "Stream": grpc.unary_stream_rpc_method_handler(stream)})  # no (de)serializers: bytes pass through
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 256 << 20)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


class RawServer:
    """The raw server in its own process, as tokenfeed's server is."""

    def __enter__(self) -> RawServer:
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.raw_grpc", "serve"],
                                     stdout=subprocess.PIPE, text=True)
        self.address = f"127.0.0.1:{self.proc.stdout.readline().strip()}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def measure(address: str, size: int, count: int) -> float:
    """Bytes per second received for ``count`` messages of ``size`` bytes."""
    options = [("grpc.max_receive_message_length", 256 << 20)]
    with grpc.insecure_channel(address, options=options) as channel:
        call = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
        list(call(f"{size},10".encode()))  # connect and warm up
        t0 = time.perf_counter()
        received = sum(len(m) for m in call(f"{size},{count}".encode()))
        return received / (time.perf_counter() - t0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["serve"])
    parser.parse_args()
    asyncio.run(_serve())
