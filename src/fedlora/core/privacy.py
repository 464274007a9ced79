"""Client-level differential privacy (DP-FedAvg, McMahan et al., ICLR 2018) on LoRA updates.

One round t, clients sampled independently with probability q (Poisson sampling, the
sampling the accountant assumes), each client's whole update δ_i (all modules and all
trained dense parameters together, in the space below):

    γ_i = min(1, C / ‖δ_i‖₂)                              clip the whole update to norm C
    δ̃   = (Σ_{i ∈ S_t} γ_i·δ_i + ξ) / D,   ξ ~ N(0, z²C²·I),   D = q·K fixed

The release δ̃ is the Gaussian mechanism with sensitivity C per client and noise multiplier z;
an accountant (``fedlora.privacy``) turns (q, z, rounds) into (ε, δ). D does not depend on who
was sampled (a data-dependent denominator would leak), so weights are uniform: data-size
weights would let a client's share grow with its example count, which C does not bound.

Where δ_i lives decides what noise does to each method (``Aggregator.dp_space``):

``factors`` (FedIT)
    δ_i = (B_i − B, A_i − A, θ_i − θ): the parameters FedIT averages. B and A get noise
    separately; the product of two noised factors carries a cross term ξ_B·ξ_A, the noise
    amplification FFA-LoRA argues against. Transmitted rank stays r.
``B`` (FFA-LoRA, FRA's FFA phase, FedSVD)
    δ_i = (B_i − B, θ_i − θ) with A frozen and shared: the noise of the product, s·ξ_B·A,
    stays in A's r-dimensional row space and is exact (no cross term). FedSVD then refactors
    the noised s·B̄·A by its SVD (``Aggregator.private_adapters``: post-processing).
``dense`` (FRA)
    δ_i = (s·B_i·A_i − s·B·A, θ_i − θ) per module, the product's increment, its norm computed
    from the factors (‖L·R‖_F² = Σ (LᵀL)∘(RRᵀ), never the m×n matrix). ξ is dense m×n per module,
    so the noised mean M̃ = s·B·A + δ̃ is formed densely, once per module; its top-r SVD becomes
    the adapters (post-processing, FedPower's design). A fixed rank-r subspace of isotropic
    noise holds about r/min(m, n) of its energy: truncation removes the rest of the noise.
``dense_exact`` (FedEx-LoRA; Fed-SB's first round)
    As ``dense``, and the global model becomes exactly W0 + M̃: the top r of M̃ go into the
    adapters and the remainder, of rank up to min(m, n), into W0 as the base delta. Exact,
    but every client downloads a full-rank delta each round (as dense as full fine-tuning).
``core`` (Fed-SB after its first round)
    δ_i = (U·Uᵀ·(B_i − B), θ_i − θ): the change of B inside the fixed column space U, i.e. of
    the r×r matrix R (‖U·ΔR‖_F = ‖ΔR‖_F), and ξ = U·ξ_R with ξ_R ~ N(0, z²C²·I_{r×r}): the
    Gaussian mechanism on R itself, r² noised numbers per module whatever m. Exact, like ``B``.

Methods without a space (HEXA, FLoRA, FlexLoRA, HetLoRA, FedHL) are refused under client DP:
their aggregates are nonlinear in the updates or carry per-client state, and no sensitivity
bound for them is implemented.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .adapter import Adapter, adapter_from_svd, module_generator
from .aggregator import Aggregator
from .errors import AggregationError, UpdateError
from .factored import SVD, Factored
from .methods.ffa import check_frozen_A
from .state import ClientUpdate, ServerState

__all__ = ["ClientDP", "DP_METHODS", "DP_SPACES", "update_norm", "effective_update_norm", "private_aggregate"]

# The built-in methods with a client-level DP space (tests/test_privacy.py checks this list
# against every registered method's ``dp_space``).
DP_METHODS = ("fedit", "ffa", "fedsvd", "fra", "fedex", "fedsb")

DP_SPACES = ("factors", "B", "dense", "dense_exact", "core")


@dataclass(frozen=True)
class ClientDP:
    clip: float  # C
    noise_multiplier: float  # z
    denominator: float  # D = q·K, the expected number of clients per round


def _product_increment(g: Adapter, a: Adapter) -> Factored:
    """s_i·B_i·A_i − s·B·A as one factored matrix of inner dimension r_i + r."""
    return Factored(torch.cat([a.scale * a.B, -g.scale * g.B], dim=1), torch.cat([a.A, g.A], dim=0))


def _module_delta(space: str, g: Adapter, a: Adapter, frame: Tensor | None = None) -> list[Tensor] | Factored:
    if space == "factors":
        return [a.B.double() - g.B.double(), a.A.double() - g.A.double()]
    if space == "B":
        return [a.B.double() - g.B.double()]
    if space == "core":
        U = frame.double()  # type: ignore[union-attr]
        return [U @ (U.T @ (a.B.double() - g.B.double()))]
    return _product_increment(g, a)


def update_norm(space: str, state: ServerState, update: ClientUpdate) -> float:
    """‖δ_i‖₂ over every module and dense parameter, in ``space`` (float64), from the global state."""
    return effective_update_norm(state.adapters, state.dense, update, space, state.extra.get("frame"))


def effective_update_norm(
    start: Mapping[str, Adapter], dense: Mapping[str, Tensor], update: ClientUpdate, space: str = "dense", frames: Mapping[str, Tensor] | None = None
) -> float:
    """‖δ_i‖₂ of ``update`` against the point it started from (its ``ClientStart``'s adapters and
    dense parameters): in the ``dense`` space ‖s_i·B_i·A_i − s·B·A‖_F per module from the factors."""
    sq = 0.0
    for name, g in start.items():
        d = _module_delta(space, g, update.adapters[name], frames[name] if frames else None)
        if isinstance(d, Factored):
            sq += max(d.inner(d), 0.0)
        else:
            sq += sum(float(t.square().sum()) for t in d)
    for key, theta in dense.items():
        sq += float((update.dense[key].double() - theta.double()).square().sum())
    return sq**0.5


def private_aggregate(aggregator: Aggregator, state: ServerState, updates: Sequence[ClientUpdate], dp: ClientDP, generator: torch.Generator) -> ServerState:
    """One round of DP-FedAvg in the method's space (``aggregator.dp_space``; see the module
    docstring). ``updates`` may be empty (nobody sampled: the release is noise alone). Returns
    the new state; ``state`` is untouched."""
    space = aggregator.dp_space(state)
    if space not in DP_SPACES:
        raise AggregationError(f"method {aggregator.name!r} has no client-level DP mechanism (the methods with one: {', '.join(DP_METHODS)})")
    split = getattr(aggregator, "split", "sqrt")
    if updates:
        aggregator.validate(state, updates)
    if space in ("B", "core"):
        check_frozen_A(state, list(updates), 1e-6)  # the noise bound covers B only
    norms = [update_norm(space, state, u) for u in updates]
    for u, n in zip(updates, norms):
        if not torch.isfinite(torch.tensor(n)):
            raise UpdateError(u.client_id, "update", f"its norm is {n}: the update is not finite")
    gammas = [min(1.0, dp.clip / n) if n > 0 else 1.0 for n in norms]
    std = dp.noise_multiplier * dp.clip
    D = dp.denominator

    def noise(shape) -> Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64) * std

    def noised_mean(base: Tensor, deltas: list[Tensor]) -> Tensor:
        total = sum((gm * d.double() for gm, d in zip(gammas, deltas)), torch.zeros(base.shape, dtype=torch.float64))
        return (base.double() + (total + noise(base.shape)) / D).to(base.dtype)

    adapters: dict[str, Adapter] = {}
    base_delta: dict[str, Factored] = {}
    kept = removed = 0.0
    for name, g in state.adapters.items():
        mine = [u.adapters[name] for u in updates]
        if space == "factors":
            adapters[name] = Adapter(
                noised_mean(g.B, [a.B.double() - g.B.double() for a in mine]), noised_mean(g.A, [a.A.double() - g.A.double() for a in mine]), g.scale
            )
        elif space == "B":
            adapters[name] = Adapter(noised_mean(g.B, [a.B.double() - g.B.double() for a in mine]), g.A.clone(), g.scale)
        elif space == "core":  # each δ_i projected on span(U) (nothing outside it is released), noise U·ξ_R
            U = state.extra["frame"][name].double()
            deltas = [_module_delta(space, g, a, U)[0] for a in mine]  # type: ignore[index]
            total = sum((gm * d for gm, d in zip(gammas, deltas)), torch.zeros(g.B.shape, dtype=torch.float64))
            adapters[name] = Adapter((g.B.double() + (total + U @ noise((g.rank, g.rank))) / D).to(g.B.dtype), g.A.clone(), g.scale)
        else:
            increments = [_product_increment(g, a) for a in mine]
            summed = Factored.stack(increments, gammas).dense(torch.float64) if increments else torch.zeros(g.shape, dtype=torch.float64)
            M = g.delta().dense(torch.float64) + (summed + noise(g.shape)) / D  # the noised mean, M̃
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            dtype = g.B.dtype
            svd = SVD(U.to(dtype), S.to(dtype), Vh.to(dtype))
            adapters[name] = adapter_from_svd(svd, g.rank, g.scale, split, module_generator(state.seed, state.round + 1, name, "dp"))
            kept += float(S[: g.rank].square().sum())
            removed += float(S[g.rank :].square().sum())
            if space == "dense_exact" and S.numel() > g.rank:
                base_delta[name] = svd.tail(g.rank).factored()
    dense = {k: noised_mean(theta, [u.dense[k].double() - theta.double() for u in updates]) for k, theta in state.dense.items()}
    info = {
        "clients": [u.client_id for u in updates],
        "dp_clipped_fraction": sum(n > dp.clip for n in norms) / len(norms) if norms else 0.0,
        "dp_mean_update_norm": sum(norms) / len(norms) if norms else 0.0,
        "dp_noise_std_of_mean": std / D,
    }
    if space in ("dense", "dense_exact") and kept + removed > 0:
        info["dp_truncated_energy"] = removed / (kept + removed)  # of M̃; the noise's share of it is the larger part at small ε
    adapters = aggregator.private_adapters(state, adapters)
    new = state.evolve(round=state.round + 1, adapters=adapters, base_delta=base_delta, dense=dense, info=info)
    return new.evolve(extra=aggregator.private_extra(state, new))
