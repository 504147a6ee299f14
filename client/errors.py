"""Exceptions the client raises, each carrying the server's message and status code."""

from __future__ import annotations

import grpc

__all__ = ["DataLossError", "RequestError", "ServerUnavailable", "TokenfeedError", "from_rpc_error"]


class TokenfeedError(RuntimeError):
    """A stream or call failed; ``code`` is the gRPC status, ``details`` the server's message."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details


class RequestError(TokenfeedError, ValueError):
    """The server refused the request as given (unknown dataset, bad field, stale cursor)."""


class ServerUnavailable(TokenfeedError, ConnectionError):
    """No server answered within the reconnect deadline."""


class DataLossError(TokenfeedError):
    """Data the job's order relies on is damaged on the server (``DATA_LOSS``): every replica
    refuses it alike; the message names the file and what to do. Not retried."""


_REFUSALS = {
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
}


def from_rpc_error(err: grpc.RpcError, address: str) -> TokenfeedError:
    """A readable exception for a failed RPC (never a bare ``_MultiThreadedRendezvous``)."""
    code, details = err.code(), err.details() or ""
    message = f"tokenfeed server {address}: {code.name}: {details}"
    kind = RequestError if code in _REFUSALS else DataLossError if code == grpc.StatusCode.DATA_LOSS else TokenfeedError
    return kind(message, code=code, details=details)
