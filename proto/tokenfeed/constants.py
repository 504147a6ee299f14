"""The wire contract's constants that need no protobuf: the server's stream logic and the client
share them through here (``tokenfeed.wire`` re-exports them beside the protobuf helpers)."""

from __future__ import annotations

import numpy as np

__all__ = ["CURSOR_VERSION", "DEFAULT_PACKING", "PACKINGS", "PROVENANCE_FIELDS", "RETRY_AFTER_KEY", "token_dtype"]

#: Version of the cursor layout; a cursor of another version is refused.
CURSOR_VERSION = 1
#: Packing modes a stream may ask for.
PACKINGS = ("concat", "bfd", "pad", "split")
DEFAULT_PACKING = "concat"
#: Fields of a provenance record (see ``BatchChunk.provenance``), one little-endian int64 each.
PROVENANCE_FIELDS = ("row", "column", "length", "source", "shard", "document", "offset")
#: Trailing metadata on a refusal that is worth retrying (here or on another replica): how long to
#: wait, in milliseconds.
RETRY_AFTER_KEY = "tokenfeed-retry-after-ms"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest token dtype on the wire that holds every id of the vocabulary."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")
