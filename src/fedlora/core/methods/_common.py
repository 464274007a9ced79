"""Small helpers shared by several methods (weighted sums of factors)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..adapter import Adapter
from ..factored import Factored
from ..parallel import per_module
from ..state import ClientUpdate

__all__ = ["mean_factors", "weighted_sum_of_deltas", "module_adapters", "per_module", "unzip"]


def mean_factors(adapters: Sequence[Adapter], p: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_i p_i·B_i, Σ_i p_i·A_i): FedAvg of the factors (all of one rank)."""
    w = p.to(adapters[0].B.dtype)
    B = torch.einsum("k,kmr->mr", w, torch.stack([a.B for a in adapters]))
    A = torch.einsum("k,krn->rn", w, torch.stack([a.A for a in adapters]))
    return B, A


def weighted_sum_of_deltas(adapters: Sequence[Adapter], p: Tensor) -> Factored:
    """Σ_i p_i·s_i·B_i·A_i exactly, as factors of inner dimension Σ_i r_i (FLoRA's stacking)."""
    return Factored.stack([a.delta() for a in adapters], [float(w) for w in p])


def module_adapters(updates: Sequence[ClientUpdate], name: str) -> list[Adapter]:
    return [u.adapters[name] for u in updates]


def unzip(out: Mapping[str, tuple]) -> tuple[dict, ...]:
    """``{name: (a, b, …)}`` → ``({name: a}, {name: b}, …)`` (the parts of :func:`per_module`'s result)."""
    width = len(next(iter(out.values()))) if out else 0
    return tuple({name: parts[i] for name, parts in out.items()} for i in range(width))
