"""HetLoRA (Cho et al., EMNLP 2024): zero-padding, sparsity-weighted average, rank self-pruning.

The global adapter has rank r_max. Client k (rank r_k) trains the first r_k
components, re-expressed at its own scaling so that its product is the
truncated global s·B[:, :r_k]·A[:r_k] (the α/r mismatch FederatedLLM#16
reports comes from skipping this). Aggregation, per module:

    B̃_k = [B_k·s_k/s, 0],   Ã_k = [A_k; 0]                 (zero-pad to r_max)
    w_k ∝ p_k·‖s_k·B_k·A_k‖_F                               (sparsity-weighted)
    B' = Σ_k w_k·B̃_k,   A' = Σ_k w_k·Ã_k                   (inexact, like FedIT)

p_k are the base weights of ``weighting``: with ``uniform`` this is the paper's rule; with
``data_size`` (fedlora's default) the norms are also weighted by examples, as in FedAvg.
If every client's product is zero the base weights are used.

Rank self-pruning (``prune_gamma`` = γ > 0; off by default) runs on the client: with t = ⌈γ·r_k⌉,
λ·Σ_modules :func:`tail_norm` = λ·Σ ‖B[:, r−t:]·A[r−t:]‖_F (λ = ``prune_strength``) is added to the
local loss, and when that sum is smaller after the round than at its start (:func:`pruned_rank`)
the client drops the last t components (:func:`self_prune`: the kept product unchanged, at the new
rank's scaling) and sends a rank-(r_k − t) adapter. The server records the rank each client sent
(``extra["ranks"]``) and sends it that rank from then on: a client's rank only shrinks, never below
``prune_min_rank``. One rank per client for all modules (the regulariser and the test are sums
over modules). Not under local DP: the rank a client reports is chosen from its data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..adapter import Adapter
from ..aggregator import Aggregator, RoundOutput
from ..registry import register
from ..state import ClientStart, ClientUpdate, SelfPruning, ServerState
from ..weights import normalise
from ._common import per_module, unzip


def tail_norm(B: Tensor, A: Tensor, gamma: float) -> Tensor:
    """‖B[:, r−t:]·A[r−t:]‖_F with t = ⌈γ·r⌉ (differentiable; the pruning regulariser), from the t×t
    Grams. The square is clamped at the dtype's smallest normal number, not 0: √ has an infinite slope
    at 0, and a zero tail (B = 0 at peft's init) would make every gradient NaN."""
    r = A.shape[0]
    t = max(1, math.ceil(gamma * r))
    Bt, At = B[:, r - t :], A[r - t :]
    return ((Bt.T @ Bt) * (At @ At.T)).sum().clamp_min(torch.finfo(B.dtype).tiny).sqrt()


def pruned_rank(rank: int, tail_now: float, tail_before: float, gamma: float, min_rank: int = 1) -> int:
    """r − ⌈γ·r⌉ (at least ``min_rank``) if the tail norm decreased during the round, else r."""
    if tail_now < tail_before:
        return max(min_rank, rank - max(1, math.ceil(gamma * rank)))
    return rank


def self_prune(start: dict[str, Adapter], trained: dict[str, Adapter], pruning: SelfPruning) -> dict[str, Adapter]:
    """The client's adapters after HetLoRA's pruning test: the first r' = :func:`pruned_rank` components
    of each module, B'·A' = B[:, :r']·A[:r'] re-expressed at r''s scaling (s'·B'·A' = s·B[:, :r']·A[:r']),
    or ``trained`` itself when the tail sum did not shrink over the round."""
    rank = next(iter(trained.values())).rank

    def tails(adapters: dict[str, Adapter]) -> float:
        return sum(float(tail_norm(a.B.double(), a.A.double(), pruning.gamma)) for a in adapters.values())

    kept = pruned_rank(rank, tails(trained), tails(start), pruning.gamma, pruning.min_rank)
    if kept == rank:
        return trained
    scale = pruning.lora.scale(kept)
    return {n: Adapter((a.B[:, :kept] * (a.scale / scale)).contiguous(), a.A[:kept].contiguous(), scale) for n, a in trained.items()}


def padded(a: Adapter, rank: int, scale: float) -> tuple[Tensor, Tensor]:
    """(B·s_k/s, A) zero-padded to ``rank`` components."""
    m, n = a.shape
    pad = rank - a.rank
    B = torch.cat([a.B * (a.scale / scale), a.B.new_zeros(m, pad)], dim=1)
    A = torch.cat([a.A, a.A.new_zeros(pad, n)], dim=0)
    return B, A


@register
class HetLoRA(Aggregator):
    name = "hetlora"
    exact = False
    mixed_ranks = True

    def __init__(self, weighting: str = "data_size", prune_gamma: float = 0.0, prune_strength: float = 1e-3, prune_min_rank: int = 1):
        super().__init__(weighting)
        if not 0 <= prune_gamma < 1:
            raise ValueError(f"prune_gamma must be in [0, 1) (0: no self-pruning), got {prune_gamma}")
        if not prune_strength >= 0:
            raise ValueError(f"prune_strength must be ≥ 0, got {prune_strength}")
        if prune_min_rank < 1:
            raise ValueError(f"prune_min_rank must be ≥ 1, got {prune_min_rank}")
        self.prune_gamma, self.prune_strength, self.prune_min_rank = prune_gamma, prune_strength, prune_min_rank
        self.self_pruning = prune_gamma > 0

    def assigned_rank(self, state: ServerState, client_id: str, rank: int) -> int:
        """The rank the client last sent, once self-pruning has lowered it."""
        return min(rank, int(state.extra.get("ranks", {}).get(client_id, rank)))

    def client_start(self, state: ServerState, rank: int | None = None) -> ClientStart:
        rank = self.client_rank(state, rank)
        scale = state.lora.scale(rank)
        prune = SelfPruning(self.prune_gamma, self.prune_strength, self.prune_min_rank, state.lora) if self.self_pruning else None
        return ClientStart(adapters={n: g.head(rank, scale) for n, g in state.adapters.items()}, dense=dict(state.dense), prune=prune)

    def _aggregate(self, state: ServerState, updates: list[ClientUpdate], p: Tensor) -> RoundOutput:
        ids = [u.client_id for u in updates]

        def module(name: str) -> tuple[Adapter, list[float]]:
            local, g = [u.adapters[name] for u in updates], state.adapters[name]
            norms = torch.tensor([a.delta().norm() for a in local], dtype=torch.float64) * p
            w = normalise(norms, "HetLoRA norm", ids) if float(norms.sum()) > 0 else p
            pads = [padded(a, state.rank, g.scale) for a in local]
            wt = w.to(g.B.dtype)
            B = torch.einsum("k,kmr->mr", wt, torch.stack([b for b, _ in pads]))
            A = torch.einsum("k,krn->rn", wt, torch.stack([a for _, a in pads]))
            return Adapter(B, A, g.scale), w.tolist()

        adapters, weights = unzip(per_module(module, state.adapters))
        if not self.self_pruning:
            return RoundOutput(adapters=adapters, info={"hetlora_weights": weights})
        first = next(iter(state.adapters))
        ranks = {**state.extra.get("ranks", {}), **{u.client_id: u.adapters[first].rank for u in updates}}
        return RoundOutput(adapters=adapters, extra={"ranks": ranks}, info={"hetlora_weights": weights})
