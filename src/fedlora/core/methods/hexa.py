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
                  residual s·Σ_i p_i·B̃_i·(Ã_i − A'), inner dimension (K−1)·r
    "svd_sqrt"    M = U·Σ·Vᵀ; s·B'·A' = M_r with B' = U_r·√(Σ_r/s), A' = √(Σ_r/s)·V_rᵀ;
                  residual = the SVD tail M − M_r, shipped as M's factors beside −s·B'·A'
                  (M_r from the Grams the drift weights already took: ``Factored.top_svd``)
    "svd_a_scale" as svd, A' = c·V_rᵀ with c = ‖Ā‖_F/√r (the mean A's row scale),
                  B' = U_r·Σ_r/(s·c)
    "lstsq"       A' = Ā = Σ p_i·Ã_i, B' = argmin_B ‖s·B·Ā − M‖_F = M·Ā⁺/s
    All are exact; they differ in how much is frozen into W0 and in the
    scale the next round's gradients see.

(e) Class-aware head (``class_aware_head=True``, ``head_keys``): each row c of
    the output layer is averaged with weights n_{i,c}/Σ_j n_{j,c} from label
    counts the clients send. Off by default: label counts can be private.

(f) Server momentum (``server_momentum`` = μ; FedAvgM, Hsu et al. 2019, on the exact
    aggregate). With Δ_t = M − s·B₀·A₀, the round's exact change of the global model,
        v_t = μ·v_{t−1} + Δ_t,      W_{t+1} = W_t + v_t = (W0 + M) + μ·v_{t−1}
    so μ·v_{t−1} travels in W0's delta beside the residual (the restart is unchanged).
    v_t stays factored in the server state: at its numerical rank (``momentum_rank=0``,
    FedAvgM exactly), or its top ``momentum_rank`` singular triplets, the dropped share of
    ‖v_t‖²_F reported as ``momentum_truncation``. Trained dense parameters (heads) follow the
    same rule on their average. μ = 0 (default) is off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..adapter import Adapter, adapter_from_svd, module_generator
from ..aggregator import Aggregator, RoundOutput
from ..dense import class_aware_average, clone_dense, weighted_average
from ..factored import Factored, block_inner, stacked_grams
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


def module_grams(views: list[Adapter], start: Adapter) -> tuple[Tensor, Tensor]:
    """Float64 Grams (LᵀL, R·Rᵀ) of [s·B̃_1, …, s·B̃_K, s·B₀]·[Ã_1; …; Ã_K; A₀], (K+1)·r square:
    the drift distances and the SVD restarts both read them (one pair of GEMMs per module).
    Every view is at the start's scaling s (``full_rank_view``), so s² multiplies G_L once."""
    s = start.scale
    GL, GR = stacked_grams([a.B for a in views] + [start.B], [a.A for a in views] + [start.A])
    return GL * (s * s), GR


def drift_distances(grams: dict[str, tuple[Tensor, Tensor]], q: Tensor) -> Tensor:
    """d_i = ‖Δ_i − Δ̄‖_F / ‖Δ̄‖_F over all modules, Δ_i = s·(B̃_iÃ_i − B₀A₀), Δ̄ = Σ q_i·Δ_i.

    From :func:`module_grams`: ⟨s·B̃_jÃ_j, s·B̃_kÃ_k⟩_F is the sum of the (j, k) r×r block of
    G_L ∘ G_R (``block_inner``; the start is block K), so the K×K Gram of the Δ_i costs nothing more."""
    K = q.numel()
    D = torch.zeros(K, K, dtype=torch.float64)
    for GL, GR in grams.values():  # summed in module order: the same bits every time
        G = block_inner(GL, GR, [GL.shape[0] // (K + 1)] * (K + 1))
        D += G[:K, :K] - G[:K, K:] - G[K:, :K] + G[K, K]
    spread = D.diagonal() - 2 * (D @ q) + q @ D @ q
    consensus = float(q @ D @ q)
    if consensus <= 1e-12 * float(D.diagonal().max()):
        # Δ̄ = 0 (the updates cancel, or none moved): no consensus to drift from. Every d_i = 0, so the
        # weights stay q; dividing by a tiny ‖Δ̄‖² instead handed one idle client everything, or NaN.
        return torch.zeros(K, dtype=torch.float64)
    return (spread.clamp_min(0) / consensus).sqrt()


@register
class HEXA(Aggregator):
    name = "hexa"
    exact = True
    mixed_ranks = True
    per_client_info = ("drift", "hexa_weights")  # d_i and the weights p_i after the drift (part c)

    def __init__(
        self,
        weighting: str = "data_size",
        restart: str = "mean",
        drift_beta: float = 1.0,
        mixed_ranks: str = "fold",
        fold_residual: bool = True,
        class_aware_head: bool = False,
        head_keys: Sequence[str] = (),
        server_momentum: float = 0.0,
        momentum_rank: int = 0,
    ):
        super().__init__(weighting)
        if restart not in RESTARTS:
            raise ValueError(f"unknown HEXA restart {restart!r}; choose one of {RESTARTS}")
        if mixed_ranks not in ("fold", "truncate"):
            raise ValueError(f"mixed_ranks must be 'fold' or 'truncate', got {mixed_ranks!r}")
        if not math.isfinite(drift_beta) or drift_beta < 0:
            raise ValueError(f"drift_beta must be a finite number ≥ 0, got {drift_beta}")
        if not (math.isfinite(server_momentum) and 0 <= server_momentum < 1):
            raise ValueError(f"server_momentum must be in [0, 1), got {server_momentum}")
        if isinstance(momentum_rank, bool) or not isinstance(momentum_rank, int) or momentum_rank < 0:
            raise ValueError(f"momentum_rank must be an integer ≥ 0 (0: the buffer at its numerical rank), got {momentum_rank!r}")
        if class_aware_head and not head_keys:
            raise ValueError("class_aware_head needs head_keys: the names of the output layer's weight and bias")
        self.restart = restart
        self.drift_beta = drift_beta
        self.fold_tail = mixed_ranks == "fold"
        self.fold_residual = fold_residual
        self.class_aware_head = class_aware_head
        self.head_keys = tuple(head_keys)
        self.server_momentum = float(server_momentum)
        self.momentum_rank = momentum_rank

    # -------------------------------------------------------------- download
    def client_start(self, state: ServerState, rank: int | None = None) -> ClientStart:
        rank = self.client_rank(state, rank)
        scale = state.lora.scale(rank)
        adapters = {n: g.head(rank, scale) for n, g in state.adapters.items()}
        tails = {n: g.tail(rank) for n, g in state.adapters.items()} if (self.fold_tail and rank < state.rank) else {}
        return ClientStart(adapters=adapters, base_delta=tails, dense=clone_dense(state.dense))

    def _needs_label_counts(self) -> bool:
        return self.class_aware_head

    # ----------------------------------------------------------- aggregation
    def _aggregate(self, state: ServerState, updates: list[ClientUpdate], p: Tensor) -> RoundOutput:
        views = {n: [full_rank_view(u.adapters[n], g, self.fold_tail) for u in updates] for n, g in state.adapters.items()}
        info: dict = {}
        w = p
        svd_restart = self.restart in ("svd_sqrt", "svd_a_scale")
        grams = {}
        if self.drift_beta > 0 or svd_restart:
            grams = per_module(lambda name: module_grams(views[name], state.adapters[name]), state.adapters)
        if self.drift_beta > 0:
            d = drift_distances(grams, p)
            # exp(−β·(d_i − d_min)) ∝ exp(−β·d_i): the same weights after normalising, but exp cannot
            # underflow to zero for every client when all d_i are large (updates that nearly cancel).
            shift = float(d[p > 0].min())
            w = normalise(p * torch.exp(-self.drift_beta * (d - shift)), "HEXA drift", [u.client_id for u in updates])
            info["drift"] = d.tolist()
        info["hexa_weights"] = w.tolist()
        # the effective number of clients 1/Σ p_i²: K for equal weights, 1 when the drift leaves one client
        info["hexa_effective_clients"] = float(1.0 / (w.double() ** 2).sum())
        adapters, residual = unzip(per_module(lambda name: self._restart(state, name, views[name], w, grams.get(name)), state.adapters))
        # Heads use the base weights as in every method; only their output rows may be class-aware.
        dense = class_aware_average(updates, p, self.head_keys) if self.class_aware_head else None
        out = RoundOutput(adapters=adapters, base_delta=residual if self.fold_residual else {}, info=info, dense=dense)
        if self.server_momentum > 0:
            self._momentum(state, updates, views, w, p, out)
        return out

    def _momentum(self, state: ServerState, updates: list[ClientUpdate], views: dict[str, list[Adapter]], w: Tensor, p: Tensor, out: RoundOutput) -> None:
        """Part (f): fold μ·v_{t−1} into W0's delta and keep v_t = μ·v_{t−1} + Δ_t (in ``out``)."""
        mu = self.server_momentum
        previous = state.extra.get("momentum", {})
        kept = {name: v * mu for name, v in previous.items()}  # μ·v_{t−1}, applied this round

        def module(name: str) -> tuple[Factored, float, float]:
            """v_t of one module, the energy its truncation drops and the energy it keeps."""
            # Δ_t = Σ_i w_i·s·B̃_i·Ã_i − s·B₀·A₀ = Σ_i w_i·s·(B̃_i − B₀)·Ã_i + s·B₀·(Ā − A₀) (Σ w_i = 1), as
            # (K+1)·r columns built from the differences: the products themselves cancel to ‖Δ_t‖ ≪ ‖G‖,
            # and an SVD of them would carry float32 round-off of ‖G‖'s size into a buffer of ‖Δ_t‖'s.
            g = state.adapters[name]
            A_step = torch.zeros(g.A.shape, dtype=torch.float64, device=g.A.device)  # Ā − A₀, summed in float64 and rounded once
            for wi, v in zip(w.tolist(), views[name]):
                A_step += wi * (v.A - g.A).double()
            delta = Factored.stack(
                [Factored(v.B - g.B, v.A) for v in views[name]] + [Factored(g.B, A_step.to(g.A.dtype))], [float(wi) * g.scale for wi in w] + [g.scale]
            )
            if name in kept:
                delta = Factored.stack([kept[name], delta])
            svd, tail = delta.truncated_svd(self.momentum_rank) if self.momentum_rank else (delta.svd(rtol=1e-7), 0.0)
            return svd.factored(), tail, float(svd.S.double().square().sum())

        buffers, tails, energies = unzip(per_module(module, state.adapters))
        for name, v in kept.items():
            out.base_delta[name] = out.base_delta[name] + v if name in out.base_delta else v
        mean = out.dense if out.dense is not None else weighted_average(updates, p)
        kept_dense = {k: mu * v for k, v in state.extra.get("momentum_dense", {}).items()}
        out.dense = {k: t + kept_dense[k] if k in kept_dense else t for k, t in mean.items()}
        out.extra = {"momentum": buffers, "momentum_dense": {k: out.dense[k] - state.dense[k] for k in mean}}
        kept_energy, dropped = sum(energies.values()), sum(tails.values())
        out.info["momentum_norm"] = math.sqrt(kept_energy)
        if self.momentum_rank:
            out.info["momentum_truncation"] = dropped / (dropped + kept_energy) if dropped + kept_energy > 0 else 0.0

    def _restart(self, state: ServerState, name: str, local: list[Adapter], p: Tensor, grams: tuple[Tensor, Tensor] | None) -> tuple[Adapter, Factored]:
        """(B', A') and the exact residual M − s·B'·A' for one module (part b)."""
        s, r = local[0].scale, state.rank
        if self.restart == "mean":
            B_mean, A_mean = mean_factors(local, p)
            return Adapter(B_mean, A_mean, s), exact_residual(local, p, A_mean, s)
        # M = Σ p_i·s·B̃_i·Ã_i and, after it, −s·B'·A' in one pair of buffers: the residual M − s·B'·A'
        # is then these factors as they stand (inner dimension K·r + r), exact for the adapter sent.
        (m, n), k = local[0].shape, len(local) * r
        L, R = local[0].B.new_empty(m, k + r), local[0].A.new_empty(k + r, n)
        for i, (a, w) in enumerate(zip(local, p.tolist())):
            torch.mul(a.B, w * s, out=L[:, i * r : (i + 1) * r])
            R[i * r : (i + 1) * r] = a.A
        M = Factored(L[:, :k], R[:k])
        if self.restart in ("lstsq", "svd_a_scale"):
            _, A_mean = mean_factors(local, p)
        if self.restart == "lstsq":
            new = Adapter((M.L @ (M.R @ torch.linalg.pinv(A_mean.double()).to(M.dtype))) / s, A_mean, s)
            return new, _minus_restart(L, R, k, new)
        # M's Grams are the views' blocks of the stacked Grams, the columns of L weighted by p_i.
        assert grams is not None
        col = torch.repeat_interleave(p.double(), r)
        top = M.top_svd(r, grams=(grams[0][:k, :k] * col[:, None] * col[None, :], grams[1][:k, :k]))
        gen = module_generator(state.seed, state.round + 1, name)
        if self.restart == "svd_sqrt":
            new = adapter_from_svd(top, r, s, "sqrt", gen)
        else:  # svd_a_scale
            new = adapter_from_svd(top, r, s, "B", gen)
            c = float(A_mean.norm()) / math.sqrt(r)
            if c > 0:
                new = Adapter(new.B / c, new.A * c, s)
        return new, _minus_restart(L, R, k, new)  # the tail M − M_r, with no m×k basis formed


def _minus_restart(L: Tensor, R: Tensor, k: int, new: Adapter) -> Factored:
    """[L[:, :k], −s·B']·[R[:k]; A'] = M − s·B'·A', written into the buffers' last r columns/rows."""
    torch.mul(new.B, -new.scale, out=L[:, k:])
    R[k:] = new.A
    return Factored(L, R)
