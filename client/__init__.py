"""tokenfeed client: a rank's stream of packed token batches as a PyTorch IterableDataset."""

from client.dataset import DatasetInfo, StreamingDataset
from client.errors import DataLossError, RequestError, ServerUnavailable, TokenfeedError
from client.loader import StreamingDataLoader
from client.plan import Edit, Plan
from client.state import plan_of as state_plan

__all__ = ["DataLossError", "DatasetInfo", "Edit", "Plan", "RequestError", "ServerUnavailable", "StreamingDataLoader",
           "StreamingDataset", "TokenfeedError", "state_plan"]
