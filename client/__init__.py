"""tokenfeed client: a rank's stream of packed token batches as a PyTorch IterableDataset."""

from client.dataset import StreamingDataset
from client.errors import RequestError, ServerUnavailable, TokenfeedError
from client.loader import StreamingDataLoader

__all__ = ["RequestError", "ServerUnavailable", "StreamingDataLoader", "StreamingDataset", "TokenfeedError"]
