"""fedlora.core — framework-free aggregation of federated LoRA updates (torch only).

Nothing here imports transformers, peft or Flower; both engines (in-process
and Flower) call into this package and nothing else for aggregation.
"""

from .adapter import Adapter, LoraSpec, init_adapter
from .aggregator import Aggregator
from .basis_svd import BasisSVD
from .errors import AggregationError, UpdateError
from .factored import SVD, Factored, pairwise_inner
from .fold import fold_delta
from .methods import available_methods, get_aggregator
from .registry import register
from .state import ClientStart, ClientUpdate, ServerState

__all__ = [
    "Adapter",
    "LoraSpec",
    "init_adapter",
    "Aggregator",
    "available_methods",
    "get_aggregator",
    "register",
    "AggregationError",
    "UpdateError",
    "SVD",
    "BasisSVD",
    "Factored",
    "pairwise_inner",
    "fold_delta",
    "ClientStart",
    "ClientUpdate",
    "ServerState",
]
