"""``Served``: what a server serves under a name, a plain ``Dataset`` or a ``Mixture`` of them.
Everything past the stages (the walker, limits, the gRPC edge, the exporter) sees this one
interface; nothing there asks which of the two it holds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from server.stages.sources.base import ShardSpec
from server.stages.tokenizers import TokenizerInfo

if TYPE_CHECKING:
    from server.stages.dataset import Dataset


class Served(Protocol):
    """A name's rows: a tokenizer, a token dtype, a content fingerprint, and shards."""

    @property
    def name(self) -> str: ...

    @property
    def info(self) -> TokenizerInfo: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def num_shards(self) -> int: ...

    @property
    def shards(self) -> list[ShardSpec]: ...

    @property
    def components(self) -> Sequence[Dataset]:
        """A mixture's components in its order (a cursor holds one position each); a dataset: none."""
        ...

    @property
    def parts(self) -> Sequence[Dataset]:
        """The plain datasets whose shards it reads: the components, or the dataset itself."""
        ...

    def describe(self) -> dict[str, Any]:
        """A plain summary (the Describe RPC's, with ``shards`` as dicts)."""
        ...

    def sources(self) -> list[dict[str, Any]]:
        """Per part: ``name``, current ``weight``, ``tokens`` (-1: not known yet), ``rows_served``."""
        ...
