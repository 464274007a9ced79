"""One LoRA adapter on one weight: W = W0 + s·B·A.

Orientation is always the mathematical one, B (out×r) and A (r×in), so that
B·A has the shape of ``nn.Linear.weight``. Layers that store their weight as
in×out (GPT-2 ``Conv1D``, peft's ``fan_in_fan_out``) are handled only where a
delta is folded into a dense weight (:mod:`fedlora.core.fold`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .basis_svd import BasisSVD
from .factored import SVD, Factored

__all__ = ["LoraSpec", "Adapter", "init_adapter", "adapter_from_svd", "module_generator"]


@dataclass(frozen=True)
class LoraSpec:
    """The scaling rule s(r): α/r (LoRA) or α/√r (rsLoRA)."""

    alpha: float = 8.0
    rslora: bool = False

    def scale(self, rank: int) -> float:
        if rank < 1:
            raise ValueError(f"LoRA rank must be ≥ 1, got {rank}")
        return self.alpha / math.sqrt(rank) if self.rslora else self.alpha / rank


@dataclass(frozen=True)
class Adapter:
    """Factors B (m×r), A (r×n) and scaling s of one adapted module."""

    B: Tensor
    A: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the adapted weight."""
        return (self.B.shape[0], self.A.shape[1])

    def delta(self) -> Factored:
        """s·B·A, the adapter's effective weight update, in factored form."""
        return Factored(self.scale * self.B, self.A)

    def numel(self) -> int:
        return self.B.numel() + self.A.numel()

    def rescaled(self, scale: float) -> Adapter:
        """The same effective update s·B·A expressed with another scaling s'."""
        return Adapter(self.B * (self.scale / scale), self.A, scale)

    def head(self, rank: int, scale: float) -> Adapter:
        """The first ``rank`` components, re-expressed at scaling ``scale`` (copies: a client may
        train them in place)."""
        return Adapter(self.B[:, :rank] * (self.scale / scale), self.A[:rank].clone(), scale)

    def tail(self, rank: int) -> Factored:
        """s·B[:, rank:]·A[rank:], the part :meth:`head` leaves out (copies)."""
        return Factored(self.scale * self.B[:, rank:], self.A[rank:].clone())

    def clone(self) -> Adapter:
        return Adapter(self.B.clone(), self.A.clone(), self.scale)


def init_adapter(
    shape: tuple[int, int],
    rank: int,
    scale: float,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> Adapter:
    """peft's default LoRA initialisation: A ~ U(−1/√n, 1/√n) (Kaiming-uniform, a=√5), B = 0.

    The effective update s·B·A is zero, so a fresh adapter leaves the model unchanged.
    """
    m, n = shape
    bound = 1.0 / math.sqrt(n)
    A = (torch.rand(rank, n, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return Adapter(torch.zeros(m, rank, dtype=dtype), A.to(dtype), scale)


def in_frame(B_start: Tensor, B: Tensor) -> Tensor:
    """C (r×r, float32) with B = B_start·C: a B trained inside the column space of the B it
    started from, in coordinates of that B (Fed-SB's upload). Least squares in float64, exact
    for such a B up to round-off times cond(B_start)."""
    return torch.linalg.lstsq(B_start.double(), B.double()).solution.float()


def from_frame(B_start: Tensor, C: Tensor) -> Tensor:
    """B = B_start·C in float64, returned as float32: what the server rebuilds from C (both
    engines compute it the same way, so they hold the same bits)."""
    return (B_start.double() @ C.double()).float()


def split_scales(S: Tensor, scale: float, split: str) -> tuple[Tensor, Tensor]:
    """(d_B, d_A) with s·diag(d_B)·diag(d_A) = diag(S): B = U·diag(d_B), A = diag(d_A)·Vh for
    ``split`` "B" (d_B = S/s, d_A = 1) or "sqrt" (both √(S/s)); see :func:`adapter_from_svd`."""
    S = S.clamp_min(0) / scale
    if split == "B":
        return S, torch.ones_like(S)
    if split == "sqrt":
        root = S.sqrt()
        return root, root
    raise ValueError(f"unknown singular-value split {split!r}; use 'B' or 'sqrt'")


def rebuilt_from_cores(start: Mapping[str, Adapter], cores: Mapping[str, Tensor]) -> dict[str, Adapter]:
    """Fed-SB's upload read back against the adapters the client was sent: B = B_start·C per
    module (:func:`from_frame`), A and the scaling as sent."""
    return {m: Adapter(from_frame(a.B, cores[m]), a.A, a.scale) for m, a in start.items()}


def adapter_from_svd(
    svd: SVD | BasisSVD,
    rank: int,
    scale: float,
    split: str,
    generator: torch.Generator,
) -> Adapter:
    """A rank-``rank`` adapter with s·B·A equal to the top-``rank`` part of ``svd``.

    ``split`` says how Σ is shared between the factors:

    * ``"B"``   — B = U_r·Σ_r/s, A = V_rᵀ (FlexLoRA, FedHL's third-party code);
    * ``"sqrt"`` — B = U_r·√(Σ_r/s), A = √(Σ_r/s)·V_rᵀ (symmetric).

    When the matrix has fewer than ``rank`` non-zero singular values (e.g. the
    all-zero global update of round 0) the missing components are filled with
    a fresh peft initialisation (A random, B = 0): the product is unchanged,
    but every component can still learn.
    """
    m, n = svd.shape
    top = svd.truncate(rank)
    k = top.rank
    dB, dA = split_scales(top.S, scale, split)
    B, A = top.U * dB, dA[:, None] * top.Vh
    if k < rank:
        fill = init_adapter((m, n), rank - k, scale, generator, dtype=top.U.dtype)
        B = torch.cat([B, fill.B], dim=1)
        A = torch.cat([A, fill.A], dim=0)
    return Adapter(B, A, scale)


def module_generator(seed: int, round: int, module: str, salt: str = "") -> torch.Generator:
    """A generator seeded by (seed, round, module): the same fresh initialisation
    on the server, on every client and after a resume, with nothing to transport."""
    key = f"{seed}/{round}/{module}/{salt}".encode()
    return torch.Generator().manual_seed(zlib.crc32(key))
