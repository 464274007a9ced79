"""Client weights p_i for one round, renormalised over the clients that reported.

* ``"data_size"`` (FedAvg): p_i = n_i / Σ_{j∈S} n_j
* ``"uniform"`` (the FedEx-LoRA paper): p_i = 1 / |S|

Methods that define their own weights (HetLoRA, FedHL, HEXA's drift term)
start from or replace these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import AggregationError
from .state import ClientUpdate

__all__ = ["WEIGHTINGS", "base_weights", "normalise"]

WEIGHTINGS = ("data_size", "uniform")


def normalise(raw: Tensor, what: str, clients: Sequence[str]) -> Tensor:
    """raw / Σ raw in float64, refusing a zero, negative or non-finite total."""
    raw = raw.double()
    total = float(raw.sum())
    if not torch.isfinite(raw).all() or (raw < 0).any():
        raise AggregationError(f"{what} weights must be finite and non-negative, got {raw.tolist()} for {list(clients)}")
    if total <= 0.0:
        raise AggregationError(f"total {what} weight is zero for clients {list(clients)}; nothing to aggregate")
    return raw / total


def base_weights(updates: Sequence[ClientUpdate], weighting: str) -> Tensor:
    """p_i for ``updates`` under ``weighting`` (float64, sums to one)."""
    ids = [u.client_id for u in updates]
    if weighting == "data_size":
        return normalise(torch.tensor([float(u.num_examples) for u in updates]), "data-size", ids)
    if weighting == "uniform":
        return torch.full((len(updates),), 1.0 / len(updates), dtype=torch.float64)
    raise AggregationError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
