"""Averaging of the fully trained (dense) parameters, e.g. classification heads.

Every method averages them the same way, with the round's base client weights:
θ' = Σ_i p_i·θ_i. HEXA can instead average the output layer class by class
(:func:`class_aware_average`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .state import ClientUpdate

__all__ = ["weighted_average", "class_aware_average"]


def weighted_average(updates: Sequence[ClientUpdate], p: Tensor) -> dict[str, Tensor]:
    """θ' = Σ_i p_i·θ_i for every dense parameter (accumulated in float64)."""
    if not updates or not updates[0].dense:
        return {}
    out = {}
    for name, ref in updates[0].dense.items():
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for w, u in zip(p, updates, strict=True):
            acc += float(w) * u.dense[name].double()
        out[name] = acc.to(ref.dtype)
    return out


def class_aware_average(
    updates: Sequence[ClientUpdate],
    p: Tensor,
    output_keys: Sequence[str],
) -> dict[str, Tensor]:
    """Row c of each output-layer tensor averaged with weights n_{i,c} / Σ_j n_{j,c}.

    A client that saw no example of class c says nothing about that class's
    row, so it should not pull it toward its (untrained) value. A class no
    participating client saw keeps the plain weights ``p``. Every other dense
    parameter gets the plain average.
    """
    out = weighted_average(updates, p)
    if any(u.label_counts is None for u in updates):
        raise ValueError("class-aware averaging needs every client's label counts")
    counts = torch.stack([u.label_counts.double() for u in updates if u.label_counts is not None])  # (K, C)
    totals = counts.sum(0)  # (C,)
    per_class = torch.where(totals > 0, counts / totals.clamp_min(1e-300), p[:, None].double())  # (K, C)
    for key in output_keys:
        if any(key not in u.dense for u in updates):
            raise ValueError(f"class-aware averaging: output-layer parameter {key!r} is not among the clients' dense parameters")
        ref = updates[0].dense[key]
        if ref.shape[0] != counts.shape[1]:
            raise ValueError(f"output-layer parameter {key!r} has {ref.shape[0]} rows but clients report {counts.shape[1]} classes")
        stacked = torch.stack([u.dense[key].double() for u in updates])  # (K, C, ...)
        w = per_class.reshape(per_class.shape + (1,) * (stacked.dim() - 2))
        out[key] = (w * stacked).sum(0).to(ref.dtype)
    return out


def clone_dense(dense: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in dense.items()}
