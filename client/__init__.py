"""tokenfeed client: a rank's stream of packed token batches as a PyTorch IterableDataset."""

from client.dataset import DatasetInfo, StreamingDataset
from client.errors import DataLossError, RequestError, ServerUnavailable, TokenfeedError
from client.loader import StreamingDataLoader

__all__ = ["DataLossError", "DatasetInfo", "RequestError", "ServerUnavailable", "StreamingDataLoader",
           "StreamingDataset", "TokenfeedError"]
