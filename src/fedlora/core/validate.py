"""Checks every client update before any arithmetic, so a bad update is refused
with an error naming the client and module, and the server state is untouched."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from .adapter import Adapter
from .errors import AggregationError, UpdateError
from .state import ClientUpdate, ServerState

__all__ = ["validate_updates", "MAX_NORM"]

# The largest Frobenius norm of a factor, dense parameter or product the core accepts: √(float32
# max) ≈ 1.8e19, so every Gram matrix LᵀL, inner product and QR factor the methods form stays
# finite in float32. A trained adapter is many orders of magnitude below it; above it, an update
# has diverged (or is hostile) and would turn the aggregate into Inf or a linear-algebra error.
MAX_NORM = math.sqrt(torch.finfo(torch.float32).max)


def _check_magnitude(t: Tensor, client: str, module: str, what: str) -> float:
    """‖t‖_F, refusing NaN, ±Inf and norms beyond MAX_NORM, in one pass over t.

    The norm is accumulated in float32 (no float64 copy of the factor): any NaN makes it NaN,
    any ±Inf or a sum of squares beyond float32's range makes it Inf, and both fail the bound;
    in range it is accurate to ~1e-6, ample for a bound. Only a refused tensor is looked at again,
    to say what is wrong with it."""
    t = t.detach()
    norm = float(torch.linalg.vector_norm(t, dtype=torch.float32)) if t.numel() else 0.0
    if norm <= MAX_NORM:
        return norm
    if bool(torch.isnan(t).any()):
        raise UpdateError(client, module, f"{what} contains NaN")
    if bool(torch.isinf(t).any()):
        raise UpdateError(client, module, f"{what} contains Inf")
    norm = float(torch.linalg.vector_norm(t.double()))
    raise UpdateError(client, module, f"{what} has norm {norm:.3g}, beyond what float32 arithmetic on it can hold ({MAX_NORM:.3g}): the update diverged")


def _check_tensor(t: object, client: str, module: str, what: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise UpdateError(client, module, f"{what} is {type(t).__name__}, not a tensor")
    if not t.is_floating_point():
        raise UpdateError(client, module, f"{what} has dtype {t.dtype}; a floating-point tensor is required")
    if t.layout != torch.strided:
        raise UpdateError(client, module, f"{what} is a {t.layout} tensor; a dense one is required")
    if t.requires_grad:  # aggregation writes into buffers (out=) autograd refuses for tensors that require grad
        raise UpdateError(client, module, f"{what} requires grad; send detached tensors (tensor.detach())")
    return t  # finiteness and magnitude: _check_magnitude, after the shape checks


def validate_updates(
    state: ServerState,
    updates: Sequence[ClientUpdate],
    *,
    same_rank: bool,
    max_rank: int | None,
    needs_label_counts: bool = False,
) -> None:
    """Raise :class:`UpdateError` / :class:`AggregationError` on the first problem found.

    ``same_rank``: every client must use the global rank (factor-averaging methods).
    ``max_rank``: the largest client rank the method can take (None = any).
    """
    if not updates:
        raise AggregationError("no client updates to aggregate")
    seen: set[str] = set()
    num_classes = None
    expected = state.shapes
    for u in updates:
        cid = str(u.client_id)
        if cid in seen:
            raise UpdateError(cid, None, "sent more than one update this round")
        seen.add(cid)
        if not isinstance(u.num_examples, numbers.Integral) or isinstance(u.num_examples, bool) or not 1 <= u.num_examples <= 2**53:
            raise UpdateError(cid, None, f"num_examples must be an integer from 1 to 2**53 (a client that trained on something), got {u.num_examples!r}")
        missing = sorted(set(expected) - set(u.adapters))
        if missing:
            raise UpdateError(cid, missing[0], "module missing from the update" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        unknown = sorted(set(u.adapters) - set(expected))
        if unknown:
            raise UpdateError(cid, unknown[0], "module is not adapted by the global model")
        for name, (m, n) in expected.items():
            a = u.adapters[name]
            if not isinstance(a, Adapter):
                raise UpdateError(cid, name, f"the module's update is {type(a).__name__}, not an Adapter(B, A, scale)")
            B = _check_tensor(a.B, cid, name, "B")
            A = _check_tensor(a.A, cid, name, "A")
            want_dtype = state.adapters[name].B.dtype
            if B.dtype != want_dtype or A.dtype != want_dtype:
                raise UpdateError(cid, name, f"dtype {B.dtype}/{A.dtype} differs from the server's {want_dtype}; cast adapters to {want_dtype} before sending")
            if B.dim() != 2 or A.dim() != 2:
                raise UpdateError(cid, name, f"B and A must be matrices, got B {tuple(B.shape)}, A {tuple(A.shape)}")
            if B.shape[1] != A.shape[0]:
                raise UpdateError(cid, name, f"rank mismatch: B is {tuple(B.shape)} but A is {tuple(A.shape)}")
            if B.shape[0] != m or A.shape[1] != n:
                raise UpdateError(cid, name, f"shape mismatch: B·A is {B.shape[0]}×{A.shape[1]}, the module is {m}×{n}")
            r = A.shape[0]
            if r < 1:
                raise UpdateError(cid, name, "rank 0 adapter")
            if same_rank and r != state.adapters[name].rank:
                raise UpdateError(
                    cid,
                    name,
                    f"rank {r} differs from the global rank {state.adapters[name].rank}; this method needs equal ranks (use hexa, fedhl, flexlora, hetlora or flora for mixed ranks)",
                )
            if max_rank is not None and r > max_rank:
                raise UpdateError(cid, name, f"rank {r} exceeds the global rank {max_rank}")
            if not isinstance(a.scale, (int, float)) or not math.isfinite(a.scale) or a.scale <= 0:
                raise UpdateError(cid, name, f"scaling must be a positive finite number, got {a.scale!r}")
            want = state.lora.scale(r)
            if abs(a.scale - want) > 1e-6 * want:
                raise UpdateError(
                    cid, name, f"scaling {a.scale:g} does not match the run's LoRA spec ({'α/√r' if state.lora.rslora else 'α/r'} = {want:g} at rank {r})"
                )
            # ‖s·B·A‖_F ≤ s·‖B‖_F·‖A‖_F: bounding the factors and that product keeps every product finite.
            nb, na = _check_magnitude(B, cid, name, "B"), _check_magnitude(A, cid, name, "A")
            if not a.scale * nb * na <= MAX_NORM:
                raise UpdateError(
                    cid, name, f"s·‖B‖·‖A‖ = {a.scale * nb * na:.3g} exceeds {MAX_NORM:.3g}: its product would overflow float32 (the update diverged)"
                )
        if set(u.dense) != set(state.dense):
            diff = sorted(set(u.dense) ^ set(state.dense))
            raise UpdateError(cid, diff[0], "dense parameter set differs from the global model's")
        for name, t in u.dense.items():
            _check_tensor(t, cid, name, "dense parameter")
            if t.dtype != state.dense[name].dtype:
                raise UpdateError(cid, name, f"dense parameter dtype {t.dtype} differs from the server's {state.dense[name].dtype}")
            _check_magnitude(t, cid, name, "dense parameter")
            if tuple(t.shape) != tuple(state.dense[name].shape):
                raise UpdateError(cid, name, f"dense parameter shape {tuple(t.shape)} != {tuple(state.dense[name].shape)}")
        if needs_label_counts:
            lc = u.label_counts
            if lc is None:
                raise UpdateError(cid, None, "label_counts are required for class-aware head aggregation")
            if lc.dim() != 1 or not bool(torch.isfinite(lc.double()).all()) or bool((lc < 0).any()):
                raise UpdateError(cid, None, f"label_counts must be a 1-D tensor of non-negative counts, got {lc.tolist()}")
            if num_classes is not None and lc.numel() != num_classes:
                raise UpdateError(cid, None, f"label_counts has {lc.numel()} classes, other clients report {num_classes}")
            num_classes = lc.numel()
