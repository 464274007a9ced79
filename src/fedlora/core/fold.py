"""Folding a factored delta into a dense frozen weight: the one place where a
dense out×in result is required, because the base weight itself is dense.

``nn.Linear`` stores W as out×in, the orientation of B·A. GPT-2's ``Conv1D``
(peft ``fan_in_fan_out=True``) stores it as in×out and needs (B·A)ᵀ = Aᵀ·Bᵀ.
Getting this wrong on a square layer raises nothing and silently breaks
exactness (the public FedEx-LoRA code transposes for ``nn.Linear``), so the
orientation is an explicit argument and shapes are checked even when square.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .factored import Factored

__all__ = ["fold_delta"]


@torch.no_grad()
def fold_delta(weight: Tensor, delta: Factored, *, fan_in_fan_out: bool = False) -> Tensor:
    """weight += delta (or deltaᵀ for fan_in_fan_out), in place, without an extra m×n temporary.

    The product is accumulated in float32 or wider; a bf16/fp16 weight is
    rounded once, at the end. The factors go to the weight's device (the
    model may train on a GPU while the core aggregates on the CPU).
    """
    m, n = delta.shape
    expected = (n, m) if fan_in_fan_out else (m, n)
    if tuple(weight.shape) != expected:
        layout = "in×out (fan_in_fan_out)" if fan_in_fan_out else "out×in"
        raise ValueError(f"cannot fold a {m}×{n} delta into a weight of shape {tuple(weight.shape)}: expected {expected} for {layout} layout")
    if delta.inner_dim == 0:
        return weight
    L, R = (delta.R.T, delta.L.T) if fan_in_fan_out else (delta.L, delta.R)
    if weight.dtype in (torch.float32, torch.float64):
        weight.addmm_(L.to(weight.device, weight.dtype), R.to(weight.device, weight.dtype))
    else:
        weight.copy_((weight.float() + L.to(weight.device, torch.float32) @ R.to(weight.device, torch.float32)).to(weight.dtype))
    return weight
