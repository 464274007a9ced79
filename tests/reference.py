"""Dense float64 reference maths for the test suite.

Written independently of ``fedlora``: nothing here imports the package. Every
expected value in the tests is computed from raw tensors with these helpers
(plain dense products, weighted means and ``torch.linalg.svd``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

F64 = torch.float64


def d(t: Tensor) -> Tensor:
    """A detached float64 copy."""
    return t.detach().to(F64)


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """LoRA's α/r, or rsLoRA's α/√r."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def product(B: Tensor, A: Tensor, s: float) -> Tensor:
    """s·B·A as a dense float64 matrix."""
    return s * (d(B) @ d(A))


def mat(L: Tensor, R: Tensor) -> Tensor:
    """L·R as a dense float64 matrix (for reading results held as two factors)."""
    return d(L) @ d(R)


def frob(M: Tensor) -> float:
    return float(torch.sqrt((d(M) ** 2).sum()))


def rel_err(got: Tensor, ref: Tensor) -> float:
    """‖got − ref‖_F / ‖ref‖_F (absolute error when ref is zero)."""
    got, ref = d(got), d(ref)
    den = frob(ref)
    num = frob(got - ref)
    return num / den if den > 0 else num


def weighted_sum(mats: Sequence[Tensor], w: Sequence[float]) -> Tensor:
    out = torch.zeros_like(d(mats[0]))
    for wi, M in zip(w, mats):
        out = out + float(wi) * d(M)
    return out


def data_weights(ns: Sequence[int]) -> list[float]:
    tot = float(sum(ns))
    return [n / tot for n in ns]


def uniform_weights(k: int) -> list[float]:
    return [1.0 / k] * k


def top_r(M: Tensor, r: int) -> Tensor:
    """The best rank-r approximation of M (Eckart–Young), via a dense float64 SVD."""
    U, S, Vh = torch.linalg.svd(d(M), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def singular_values(M: Tensor) -> Tensor:
    return torch.linalg.svdvals(d(M))


def tail_energy(M: Tensor, r: int) -> float:
    """Σ_{j>r} σ_j(M)²."""
    S = singular_values(M)
    return float((S[r:] ** 2).sum())


def numerical_rank(M: Tensor, rtol: float) -> int:
    S = singular_values(M)
    return int((S > rtol * S[0]).sum()) if S.numel() and S[0] > 0 else 0


def normalised(raw: Sequence[float]) -> list[float]:
    tot = float(sum(raw))
    return [float(x) / tot for x in raw]


def fedhl_weights(r_hat: Sequence[float], eps: float) -> list[float]:
    """p_i = (1/(r̂_i² + ε)) / Σ_j (1/(r̂_j² + ε))."""
    return normalised([1.0 / (r * r + eps) for r in r_hat])


def drift(deltas: Sequence[dict[str, Tensor]], q: Sequence[float]) -> list[float]:
    """d_i = ‖Δ_i − Δ̄‖_F / ‖Δ̄‖_F with all modules' entries taken together, Δ̄ = Σ q_i Δ_i."""
    names = list(deltas[0])
    mean = {n: weighted_sum([dl[n] for dl in deltas], q) for n in names}
    den = math.sqrt(sum(frob(mean[n]) ** 2 for n in names))
    return [math.sqrt(sum(frob(dl[n] - mean[n]) ** 2 for n in names)) / den for dl in deltas]


def drift_weights(dist: Sequence[float], q: Sequence[float], beta: float) -> list[float]:
    """p_i ∝ q_i·exp(−β·d_i), evaluated in log space (no underflow when every d_i is large)."""
    logs = [math.log(qi) - beta * di if qi > 0 else -math.inf for qi, di in zip(q, dist)]
    top = max(logs)
    return normalised([math.exp(x - top) for x in logs])


def pair_cosines(encoder, tokenizer, first: Sequence[str], second: Sequence[str], max_length: int = 512) -> Tensor:
    """A bi-encoder's cos(u, v) per pair in float64, u and v each sentence's mean-pooled last hidden
    state, each sentence encoded alone (a batch of one: no padding anywhere). The sentences are the
    tokenizer's pair encoding cut by token type in plain Python, [CLS] put before the second: what
    the pair's longest-first truncation to ``max_length`` left of each."""

    def embed(ids: list[int]) -> Tensor:
        with torch.no_grad():
            return encoder(input_ids=torch.tensor([ids])).last_hidden_state[0].to(F64).mean(0)

    out = []
    for a, b in zip(first, second):
        enc = tokenizer(a, b, truncation=True, max_length=max_length)
        ids_a = [t for t, k in zip(enc["input_ids"], enc["token_type_ids"]) if k == 0]
        ids_b = [tokenizer.cls_token_id] + [t for t, k in zip(enc["input_ids"], enc["token_type_ids"]) if k == 1]
        u, v = embed(ids_a), embed(ids_b)
        out.append(u @ v / u.norm() / v.norm())
    return torch.stack(out)
