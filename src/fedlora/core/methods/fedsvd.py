"""FedSVD (NeurIPS 2025; code seanie12/fed-svd, ``misc/utils.py::reinit_lora``): clients train B
with A frozen and shared, the server averages B and re-orthonormalises A by an SVD.

    B̄ = Σ_i p_i·B_i                                   (exact: A is the same on every client)
    s·B̄·A = U·Σ·Vᵀ  (top r)                           SVD of the rank-≤r product, from its factors
    A' = V_rᵀ,   B' = U_r·Σ_r / s                      s·B'·A' = s·B̄·A: the product is unchanged

Exact every round, like FFA-LoRA, but A follows the directions the clients' B's use instead of
staying at its random initialisation, and its rows are orthonormal (which FedSVD argues bounds
the noise DP-SGD adds to B). Upload: B only, m·r per module (A returns unchanged and is checked);
download: B' and A'. Components a rank-deficient product lacks (round 0) get a fresh peft init.
"""

from __future__ import annotations

from torch import Tensor

from ..adapter import Adapter, adapter_from_svd, module_generator
from ..aggregator import RoundOutput
from ..factored import Factored
from ..registry import register
from ..state import ClientUpdate, ServerState
from ._common import mean_factors, module_adapters, per_module
from .ffa import FFA, check_frozen_A


@register
class FedSVD(FFA):
    """FFA-LoRA's round (A frozen, B averaged), then A follows the product's row space."""

    name = "fedsvd"
    exact = True

    def _aggregate(self, state: ServerState, updates: list[ClientUpdate], p: Tensor) -> RoundOutput:
        check_frozen_A(state, updates, self.frozen_rtol)
        return RoundOutput(adapters=per_module(lambda name: self._follow(state, name, mean_factors(module_adapters(updates, name), p)[0]), state.adapters))

    def private_adapters(self, state: ServerState, adapters: dict[str, Adapter]) -> dict[str, Adapter]:
        """Under client-level DP the noised B̄ (FFA-LoRA's space), then the same SVD: A follows
        the noised product's row space (post-processing of the release)."""
        return {name: self._follow(state, name, a.B) for name, a in adapters.items()}

    def _follow(self, state: ServerState, name: str, B: Tensor) -> Adapter:
        """s·B·A (A this round's shared one) refactored as A' = V_rᵀ, B' = U_r·Σ_r / s."""
        g = state.adapters[name]
        svd = Factored(g.scale * B, g.A).svd(rank=state.rank, rtol=1e-7)  # numerical zeros get a fresh init
        return adapter_from_svd(svd, state.rank, g.scale, "B", module_generator(state.seed, state.round + 1, name))
