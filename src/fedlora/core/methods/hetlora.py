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
If every client's product is zero the base weights are used. Rank
self-pruning runs on the client: :func:`tail_norm` is the regulariser
‖B[:, r−⌈γr⌉:r]·A[r−⌈γr⌉:r]‖_F added to the local loss, and
:func:`pruned_rank` drops the tail ⌈γr⌉ components when that norm shrank
over the round. The client then reports a smaller rank.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..adapter import Adapter
from ..aggregator import Aggregator, RoundOutput
from ..registry import register
from ..state import ClientStart, ClientUpdate, ServerState
from ..weights import normalise
from ._common import per_module, unzip


def tail_norm(B: Tensor, A: Tensor, gamma: float) -> Tensor:
    """‖B[:, r−t:]·A[r−t:]‖_F with t = ⌈γ·r⌉ (differentiable; the pruning regulariser)."""
    r = A.shape[0]
    t = max(1, math.ceil(gamma * r))
    Bt, At = B[:, r - t :], A[r - t :]
    return ((Bt.T @ Bt) * (At @ At.T)).sum().clamp_min(0).sqrt()


def pruned_rank(rank: int, tail_now: float, tail_before: float, gamma: float, min_rank: int = 1) -> int:
    """r − ⌈γ·r⌉ (at least ``min_rank``) if the tail norm decreased during the round, else r."""
    if tail_now < tail_before:
        return max(min_rank, rank - max(1, math.ceil(gamma * rank)))
    return rank


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

    def client_start(self, state: ServerState, rank: int | None = None) -> ClientStart:
        rank = self.client_rank(state, rank)
        scale = state.lora.scale(rank)
        return ClientStart(adapters={n: g.head(rank, scale) for n, g in state.adapters.items()}, dense=dict(state.dense))

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
        return RoundOutput(adapters=adapters, info={"hetlora_weights": weights})
