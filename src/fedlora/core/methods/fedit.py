"""FedIT (Zhang et al., ICASSP 2024): FedAvg of the LoRA factors.

    B' = Σ_i p_i·B_i,   A' = Σ_i p_i·A_i

Inexact: s·B'·A' ≠ Σ_i p_i·s·B_i·A_i in general (the cross terms B_i·A_j, i≠j,
enter the product). The error is reported as ``info["inexactness"]``:
‖Σ p_i s B_i A_i − s B'A'‖_F / ‖Σ p_i s B_i A_i‖_F, computed in factored form.
All clients must share the global rank.
"""

from __future__ import annotations

from torch import Tensor

from ..adapter import Adapter
from ..aggregator import Aggregator, RoundOutput
from ..registry import register
from ..state import ClientUpdate, ServerState
from ._common import mean_factors, module_adapters, per_module, unzip, weighted_sum_of_deltas


@register
class FedIT(Aggregator):
    name = "fedit"
    exact = False

    def __init__(self, weighting: str = "data_size", measure_error: bool = True):
        super().__init__(weighting)
        self.measure_error = measure_error

    def dp_space(self, state: ServerState) -> str:
        return "factors"

    def _aggregate(self, state: ServerState, updates: list[ClientUpdate], p: Tensor) -> RoundOutput:

        def module(name: str) -> tuple[Adapter, float, float]:
            local, g = module_adapters(updates, name), state.adapters[name]
            B, A = mean_factors(local, p)
            new = Adapter(B, A, g.scale)
            if not self.measure_error:
                return new, 0.0, 0.0
            ideal = weighted_sum_of_deltas(local, p)
            diff = ideal - new.delta()  # factors [ideal.L, −s·B'] and [ideal.R; A']
            # ‖M‖² = Σ (LᵀL)∘(RRᵀ) (Factored.inner); one Gram product serves both norms,
            # since ideal's Gram is the leading k×k block of diff's.
            L, R = diff.L.double(), diff.R.double()
            gram = (L.T @ L) * (R @ R.T)
            k = ideal.inner_dim
            return new, max(float(gram.sum()), 0.0), max(float(gram[:k, :k].sum()), 0.0)

        adapters, nums, dens = unzip(per_module(module, state.adapters))
        num, den = sum(nums.values()), sum(dens.values())
        info = {"inexactness": (num / den) ** 0.5 if den > 0 else 0.0} if self.measure_error else {}
        return RoundOutput(adapters=adapters, info=info)
