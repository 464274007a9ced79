"""Exactness against bandwidth: the base delta at the rank a tolerance allows.

Exact methods (FedEx-LoRA, HEXA, FLoRA) send every client the round's base delta ΔW0, of inner
dimension up to K·r + r per module: 11 times FedIT's download at LLaMA-7B shapes with 10
clients. ``residual_tol`` = τ > 0 sends instead, per module, its best approximation of the
smallest rank k with

    ‖ΔW0 − ΔW0_k‖_F ≤ τ·‖ΔW0‖_F          (Eckart–Young: Σ_{j>k} σ_j² ≤ τ²·Σ_j σ_j²)

taken from the SVD of the factors (QR of both, SVD of the small core; never m×n). The global
model then differs from the exact one by at most τ·‖ΔW0‖_F per module and round; the dropped
part is reported (``residual_dropped``: the largest relative error over modules, and
``residual_rank``: the largest rank sent). τ = 0 keeps ΔW0 exactly as the method computed it.
"""

from __future__ import annotations

import torch

from .factored import Factored
from .state import ServerState

__all__ = ["truncate_base_delta"]


def truncate_base_delta(state: ServerState, tol: float) -> ServerState:
    """``state`` with each module's base delta at the smallest rank within relative error ``tol``."""
    if tol <= 0 or not state.base_delta:
        return state
    out: dict[str, Factored] = {}
    worst, rank = 0.0, 0
    for name, delta in state.base_delta.items():
        svd = delta.svd()
        energy = svd.S.double().square()
        total = float(energy.sum())
        if total == 0.0:
            out[name] = Factored.zeros(*delta.shape, dtype=delta.dtype)
            continue
        tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # tail[k] = Σ_{j≥k} σ_j²
        allowed = (tol**2) * total
        k = int((tail > allowed).sum())  # the smallest k with Σ_{j≥k} σ_j² ≤ τ²·total
        out[name] = svd.truncate(k).factored()
        dropped = float(energy[k:].sum())
        worst = max(worst, (dropped / total) ** 0.5)
        rank = max(rank, k)
    info = {**state.info, "residual_dropped": worst, "residual_rank": rank}
    return state.evolve(base_delta=out, info=info)
