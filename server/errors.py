"""Domain errors of the server; the gRPC layer maps each to one status code."""

from __future__ import annotations


class TokenfeedError(Exception):
    """Base class of the errors a request can cause."""


class NotFound(TokenfeedError):
    """A named thing (a dataset) does not exist."""


class InvalidArgument(TokenfeedError):
    """A request field is out of range or malformed; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class FailedPrecondition(TokenfeedError):
    """The request is well-formed but does not fit the server's state (e.g. a stale cursor)."""


class Unavailable(TokenfeedError):
    """An environment fault (an I/O error, a timeout) outlasted its retries; nothing was cached,
    and the client resumes from its cursor, here or on another replica."""


class DataLoss(TokenfeedError):
    """Data that the global order relies on is damaged (a prepared shard fails its checksum):
    every reader of it is refused alike, never served something else in its place."""


class ConfigError(ValueError):
    """The server configuration is invalid; the message names the field or path."""
