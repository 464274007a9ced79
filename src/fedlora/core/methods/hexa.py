"""HEXA — heterogeneity-aware exact aggregation (Garofalo, Villari, Karray; IJCNN 2025).

Only the paper's abstract is public. This is fedlora's design of it (see
docs/hexa.md), in five switchable parts. Per module, with the round's global
adapter (B₀, A₀) of rank r and scaling s:

(d) Mixed ranks without truncation bias (``mixed_ranks="fold"``). A client of
    rank r_i < r trains the top r_i components; the rest, s·B₀[:, r_i:]·A₀[r_i:],
    is folded into that client's frozen base, so every client starts from
    exactly the global model. The server rebuilds each client's update as a
    full rank-r adapter at scaling s:
        B̃_i = [B_i·s_i/s, B₀[:, r_i:]],   Ã_i = [A_i; A₀[r_i:]]
    (``"truncate"`` drops the tail instead, HetLoRA-style, for the ablation.)

(c) Drift-aware weights (``drift_beta`` = β). With Δ_i = s·(B̃_i·Ã_i − B₀·A₀)
    and the consensus Δ̄ = Σ_i q_i·Δ_i (q = data-size weights), summed over modules:
        d_i = ‖Δ_i − Δ̄‖_F / ‖Δ̄‖_F,    p_i ∝ q_i·exp(−β·d_i)
    computed from the K×K Gram matrix of the factored Δ_i. β = 0 turns it off.

(a) Exact (``fold_residual=True``). M = Σ_i p_i·s·B̃_i·Ã_i is the target; after
    the round W0' + s·B'·A' = W0 + M for whatever restart point (B', A'):
        W0' = W0 + (M − s·B'·A')                  (shipped in factored form)

(b) Restart point (``restart``):
    "mean"        B' = Σ p_i·B̃_i, A' = Σ p_i·Ã_i (FedEx-LoRA's rule);
                  residual s·Σ_i p_i·B̃_i·(Ã_i − A'), inner dimension K·r
    "svd_sqrt"    M = U·Σ·Vᵀ; s·B'·A' = M_r with B' = U_r·√(Σ_r/s), A' = √(Σ_r/s)·V_rᵀ;
                  residual = the SVD tail M − M_r
    "svd_a_scale" as svd, A' = c·V_rᵀ with c = ‖Ā‖_F/√r (the mean A's row scale),
                  B' = U_r·Σ_r/(s·c)
    "lstsq"       A' = Ā = Σ p_i·Ã_i, B' = argmin_B ‖s·B·Ā − M‖_F = M·Ā⁺/s
    All are exact; they differ in how much is frozen into W0 and in the
    scale the next round's gradients see.

(e) Class-aware head (``class_aware_head=True``, ``head_keys``): each row c of
    the output layer is averaged with weights n_{i,c}/Σ_j n_{j,c} from label
    counts the clients send. Off by default: label counts can be private.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..adapter import Adapter, adapter_from_svd, module_generator
from ..aggregator import Aggregator, RoundOutput
from ..dense import class_aware_average
from ..factored import Factored, pairwise_inner
from ..registry import register
from ..state import ClientStart, ClientUpdate, ServerState
from ..weights import normalise
from ._common import mean_factors, per_module, unzip
from .fedex import exact_residual

RESTARTS = ("mean", "svd_sqrt", "svd_a_scale", "lstsq")


def full_rank_view(update: Adapter, g: Adapter, fold_tail: bool) -> Adapter:
    """A client's update as a rank-r adapter at the global scaling s (part d)."""
    r_i, r = update.rank, g.rank
    B = update.B * (update.scale / g.scale)
    A = update.A
    if r_i < r:
        tail_B = g.B[:, r_i:] if fold_tail else g.B.new_zeros(g.B.shape[0], r - r_i)
        tail_A = g.A[r_i:] if fold_tail else g.A.new_zeros(r - r_i, g.A.shape[1])
        B, A = torch.cat([B, tail_B], dim=1), torch.cat([A, tail_A], dim=0)
    return Adapter(B, A, g.scale)


def drift_distances(views: dict[str, list[Adapter]], start: dict[str, Adapter], q: Tensor) -> Tensor:
    """d_i = ‖Δ_i − Δ̄‖_F / ‖Δ̄‖_F over all modules, Δ_i = s·(B̃_iÃ_i − B₀A₀), Δ̄ = Σ q_i·Δ_i."""
    K = q.numel()

    def module(name: str) -> Tensor:
        G = pairwise_inner([a.delta() for a in views[name]] + [start[name].delta()])  # (K+1)²
        return G[:K, :K] - G[:K, K:] - G[K:, :K] + G[K, K]

    D = torch.zeros(K, K, dtype=torch.float64)
    for part in per_module(module, views).values():  # summed in module order: the same bits every time
        D += part
    spread = D.diagonal() - 2 * (D @ q) + q @ D @ q
    consensus = float(q @ D @ q)
    return (spread.clamp_min(0) / max(consensus, 1e-300)).sqrt()


@register
class HEXA(Aggregator):
    name = "hexa"
    exact = True
    mixed_ranks = True

    def __init__(
        self,
        weighting: str = "data_size",
        restart: str = "mean",
        drift_beta: float = 1.0,
        mixed_ranks: str = "fold",
        fold_residual: bool = True,
        class_aware_head: bool = False,
        head_keys: Sequence[str] = (),
    ):
        super().__init__(weighting)
        if restart not in RESTARTS:
            raise ValueError(f"unknown HEXA restart {restart!r}; choose one of {RESTARTS}")
        if mixed_ranks not in ("fold", "truncate"):
            raise ValueError(f"mixed_ranks must be 'fold' or 'truncate', got {mixed_ranks!r}")
        if not math.isfinite(drift_beta) or drift_beta < 0:
            raise ValueError(f"drift_beta must be a finite number ≥ 0, got {drift_beta}")
        if class_aware_head and not head_keys:
            raise ValueError("class_aware_head needs head_keys: the names of the output layer's weight and bias")
        self.restart = restart
        self.drift_beta = drift_beta
        self.fold_tail = mixed_ranks == "fold"
        self.fold_residual = fold_residual
        self.class_aware_head = class_aware_head
        self.head_keys = tuple(head_keys)

    # -------------------------------------------------------------- download
    def client_start(self, state: ServerState, rank: int | None = None) -> ClientStart:
        rank = self.client_rank(state, rank)
        scale = state.lora.scale(rank)
        adapters = {n: g.head(rank, scale) for n, g in state.adapters.items()}
        tails = {n: g.tail(rank) for n, g in state.adapters.items()} if (self.fold_tail and rank < state.rank) else {}
        return ClientStart(adapters=adapters, base_delta=tails, dense=dict(state.dense))

    def _needs_label_counts(self) -> bool:
        return self.class_aware_head

    # ----------------------------------------------------------- aggregation
    def _aggregate(self, state: ServerState, updates: list[ClientUpdate], p: Tensor) -> RoundOutput:
        views = {n: [full_rank_view(u.adapters[n], g, self.fold_tail) for u in updates] for n, g in state.adapters.items()}
        info: dict = {}
        w = p
        if self.drift_beta > 0:
            d = drift_distances(views, dict(state.adapters), p)
            # exp(−β·(d_i − d_min)) ∝ exp(−β·d_i): the same weights after normalising, but exp cannot
            # underflow to zero for every client when all d_i are large (updates that nearly cancel).
            shift = float(d[p > 0].min())
            w = normalise(p * torch.exp(-self.drift_beta * (d - shift)), "HEXA drift", [u.client_id for u in updates])
            info["drift"] = d.tolist()
        info["hexa_weights"] = w.tolist()
        adapters, residual = unzip(per_module(lambda name: self._restart(state, name, views[name], w), state.adapters))
        # Heads use the base weights as in every method; only their output rows may be class-aware.
        dense = class_aware_average(updates, p, self.head_keys) if self.class_aware_head else None
        return RoundOutput(adapters=adapters, base_delta=residual if self.fold_residual else {}, info=info, dense=dense)

    def _restart(self, state: ServerState, name: str, local: list[Adapter], p: Tensor) -> tuple[Adapter, Factored]:
        """(B', A') and the exact residual M − s·B'·A' for one module (part b)."""
        s, r = local[0].scale, state.rank
        if self.restart == "mean":
            B_mean, A_mean = mean_factors(local, p)
            return Adapter(B_mean, A_mean, s), exact_residual(local, p, A_mean, s)
        M = Factored.stack([a.delta() for a in local], p.tolist())
        if self.restart in ("lstsq", "svd_a_scale"):
            _, A_mean = mean_factors(local, p)
        if self.restart == "lstsq":
            B = (M.L @ (M.R @ torch.linalg.pinv(A_mean.double()).to(M.dtype))) / s
            new = Adapter(B, A_mean, s)
            return new, M - new.delta()
        svd = M.svd()
        gen = module_generator(state.seed, state.round + 1, name)
        if self.restart == "svd_sqrt":
            new = adapter_from_svd(svd, r, s, "sqrt", gen)
        else:  # svd_a_scale
            new = adapter_from_svd(svd, r, s, "B", gen)
            c = float(A_mean.norm()) / math.sqrt(r)
            if c > 0:
                new = Adapter(new.B / c, new.A * c, s)
        return new, svd.tail(r).factored()
