"""FRA-LoRA (Trautmann, Hales, Volk; FLTA 2024): full-rank aggregation, SVD back to rank r.

    ΔW = Σ_i p_i·s_i·B_i·A_i                 (exact average of the full increments)
    ΔW = U·Σ·Vᵀ,   keep the top r:  s·B'·A' = U_r·Σ_r·V_rᵀ
    split (assumed; the paper's choice is not public):
        "sqrt": B' = U_r·√(Σ_r/s),  A' = √(Σ_r/s)·V_rᵀ     (default)
        "B":    B' = U_r·Σ_r/s,     A' = V_rᵀ

The remainder ΔW − ΔW_r is dropped (the truncation error, reported as
``info["truncation_error"]`` = ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F). Because ΔW is a plain
weighted sum of per-client increments, DP clipping/noising and secure
aggregation apply to it unchanged and the SVD is post-processing.

Hybrid (``fra_rounds=T``): FRA for rounds 0…T−1, then FFA-LoRA — A frozen at
the last FRA round's A' and only B averaged, which is exact again.
The SVD of the stacked factors costs O((Σr_i)²(m+n)); ΔW is never formed.
"""

from __future__ import annotations

from torch import Tensor

from ..adapter import Adapter, adapter_from_svd, module_generator
from ..aggregator import Aggregator, RoundOutput
from ..registry import register
from ..state import ClientStart, ClientUpdate, ServerState
from ._common import module_adapters, per_module, unzip, weighted_sum_of_deltas
from .ffa import average_B, check_frozen_A


@register
class FRA(Aggregator):
    name = "fra"
    exact = False

    def __init__(self, weighting: str = "data_size", split: str = "sqrt", fra_rounds: int | None = None, frozen_rtol: float = 1e-6):
        super().__init__(weighting)
        if split not in ("sqrt", "B"):
            raise ValueError(f"split must be 'sqrt' or 'B', got {split!r}")
        if fra_rounds is not None and fra_rounds < 1:
            raise ValueError(f"fra_rounds must be ≥ 1 (or None for FRA in every round), got {fra_rounds}")
        self.split = split
        self.fra_rounds = fra_rounds
        self.frozen_rtol = frozen_rtol

    def in_ffa_phase(self, state: ServerState) -> bool:
        return self.fra_rounds is not None and state.round >= self.fra_rounds

    def client_start(self, state: ServerState, rank: int | None = None) -> ClientStart:
        start = super().client_start(state, rank)
        return ClientStart(adapters=start.adapters, dense=start.dense, train_A=not self.in_ffa_phase(state))

    def dp_space(self, state: ServerState) -> str:
        return "B" if self.in_ffa_phase(state) else "dense"

    def _aggregate(self, state: ServerState, updates: list[ClientUpdate], p: Tensor) -> RoundOutput:
        if self.in_ffa_phase(state):
            check_frozen_A(state, updates, self.frozen_rtol)
            return RoundOutput(adapters=average_B(state, updates, p), info={"phase": "ffa"})

        def module(name: str) -> tuple[Adapter, float, float]:
            full = weighted_sum_of_deltas(module_adapters(updates, name), p)
            # only the top-r vectors are needed; directions of no weight (σ ≤ 1e-7·σ₁: a module that did not
            # train, a rank-deficient aggregate) are dropped so that adapter_from_svd fills them with a fresh
            # init: kept, they would give B = A = 0 rows under the sqrt split, which never get a gradient again
            svd, tail = full.truncated_svd(state.rank, rtol=1e-7)
            gen = module_generator(state.seed, state.round + 1, name)
            return adapter_from_svd(svd, state.rank, state.adapters[name].scale, self.split, gen), tail, svd.tail_energy(0) + tail

        adapters, tails, totals = unzip(per_module(module, state.adapters))
        dropped, total = sum(tails.values()), sum(totals.values())
        err = (dropped / total) ** 0.5 if total > 0 else 0.0
        return RoundOutput(adapters=adapters, info={"phase": "fra", "truncation_error": err})
