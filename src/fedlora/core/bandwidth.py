"""Exactness against bandwidth: the base delta at the rank a tolerance allows.

Exact methods (FedEx-LoRA, HEXA, FLoRA) send every client the round's base delta ΔW0, of inner
dimension up to K·r per module (FedEx-LoRA: (K−1)·r residual columns beside the rank-r adapter):
10 times FedIT's download at LLaMA-7B shapes with 10 clients. ``residual_tol`` = τ > 0 sends instead, per module, its best approximation of the
smallest rank k with

    ‖ΔW0 − ΔW0_k‖_F ≤ τ·‖ΔW0‖_F          (Eckart–Young: Σ_{j>k} σ_j² ≤ τ²·Σ_j σ_j²)

taken from the SVD of the factors (QR of both, SVD of the small core; never m×n). The global
model then differs from the exact one by at most τ·‖ΔW0‖_F per module and round; the dropped
part is reported (``residual_dropped``: the largest relative error over modules, and
``residual_rank``: the largest rank sent). τ = 0 keeps ΔW0 exactly as the method computed it.

``transport`` = bfloat16 halves every message: each number a client or the server sends is
rounded to bf16 (8 bits of mantissa: a relative error ≤ 2⁻⁹ per entry). The server rounds its
own new state (adapters, heads, base delta) to what it sends, so the server and every client
hold the same values, bit for bit, and exact methods stay exact with respect to what was
transmitted; the cost is the rounding of each round's factors, never an accumulating mismatch.
One exception: FedHL keeps the untruncated W_t beside the adapters and adds each client's change
from the start *it computed* (unrounded), while the client started from the rounded download, so
each round's rounding of the starts stays in W_t: a random walk, measured at 2.1e-3 of ‖W‖ after
one round and 1.1e-2 after 200 rounds of clients that send back exactly what they received
(MiniLM-sized module, rank 8, ranks 2/4/8/8). Use float32 transport for FedHL over long runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor

from .adapter import Adapter
from .factored import Factored
from .parallel import per_module
from .state import ClientStart, ClientUpdate, ServerState

__all__ = ["truncate_base_delta", "TRANSPORTS", "transport_state", "transport_start", "transport_update"]

TRANSPORTS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ERROR_MODULES = 16  # modules on which transport_error is measured (see transport_state)


def truncate_base_delta(state: ServerState, tol: float) -> ServerState:
    """``state`` with each module's base delta at the smallest rank within relative error ``tol``."""
    if tol <= 0 or not state.base_delta:
        return state

    def module(name: str) -> tuple[Factored, float, int]:
        delta = state.base_delta[name]
        svd = delta.svd()
        energy = svd.S.double().square()
        total = float(energy.sum())
        if total == 0.0:
            return Factored.zeros(*delta.shape, dtype=delta.dtype), 0.0, 0
        tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # tail[k] = Σ_{j≥k} σ_j²
        allowed = (tol**2) * total
        k = int((tail > allowed).sum())  # the smallest k with Σ_{j≥k} σ_j² ≤ τ²·total
        return svd.truncate(k).factored(), (float(energy[k:].sum()) / total) ** 0.5, k

    results = per_module(module, state.base_delta)
    out = {name: f for name, (f, _, _) in results.items()}
    worst = max((e for _, e, _ in results.values()), default=0.0)
    rank = max((k for _, _, k in results.values()), default=0)
    info = {**state.info, "residual_dropped": worst, "residual_rank": rank}
    return state.evolve(base_delta=out, info=info)


def _rounded(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).to(t.dtype)


def _adapters(adapters: Mapping[str, Adapter], dtype: torch.dtype) -> dict[str, Adapter]:
    return {k: Adapter(_rounded(a.B, dtype), _rounded(a.A, dtype), a.scale) for k, a in adapters.items()}


def _deltas(deltas: Mapping[str, Factored], dtype: torch.dtype) -> dict[str, Factored]:
    return {k: Factored(_rounded(d.L, dtype), _rounded(d.R, dtype)) for k, d in deltas.items()}


def _dense(dense: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: _rounded(v, dtype) for k, v in dense.items()}


def transport_state(state: ServerState, dtype: torch.dtype) -> ServerState:
    """The server's state rounded to what it sends: adapters, heads and base delta.

    ``info["transport_error"]``: the largest relative change the rounding makes to a module's
    round result s·B·A + ΔW0 (its Frobenius norm, from the factors), over at most
    ``ERROR_MODULES`` modules spread evenly over the model (all of them in smaller models): the
    norm of a factored difference costs a Gram of inner dimension 2·(r + rank ΔW0), about as
    much as the aggregation itself at LLaMA-7B shapes, and rounding errs alike in every module."""
    if dtype == torch.float32:
        return state
    adapters, deltas = _adapters(state.adapters, dtype), _deltas(state.base_delta, dtype)
    names = list(state.adapters)
    step = max(1, -(-len(names) // ERROR_MODULES))  # ceil: at most ERROR_MODULES names

    def error(name: str) -> float:
        a, r = state.adapters[name], adapters[name]
        exact = Factored(a.scale * a.B, a.A)
        rounded = Factored(r.scale * r.B, r.A)
        if name in state.base_delta:
            exact, rounded = exact + state.base_delta[name], rounded + deltas[name]
        size = exact.norm()
        return (rounded - exact).norm() / size if size > 0 else 0.0

    worst = max(per_module(error, names[::step]).values(), default=0.0)
    info = {**state.info, "transport_error": worst}
    return state.evolve(adapters=adapters, dense=_dense(state.dense, dtype), base_delta=deltas, info=info)


def transport_start(start: ClientStart, dtype: torch.dtype) -> ClientStart:
    """A client's starting point as it arrives (its client-only base delta included)."""
    if dtype == torch.float32:
        return start
    return replace(start, adapters=_adapters(start.adapters, dtype), base_delta=_deltas(start.base_delta, dtype), dense=_dense(start.dense, dtype))


def transport_update(update: ClientUpdate, dtype: torch.dtype) -> ClientUpdate:
    """A client's update as the server receives it."""
    if dtype == torch.float32:
        return update
    if update.cores:  # Fed-SB: only C travels; the adapters are rebuilt from the rounded C (engine/client.py)
        return replace(update, cores=_dense(update.cores, dtype), dense=_dense(update.dense, dtype))
    return replace(update, adapters=_adapters(update.adapters, dtype), dense=_dense(update.dense, dtype))
