"""FedEx-LoRA (Singhal et al., ACL 2025): exact aggregation, residual folded into W0.

    B̄ = Σ_i p_i·B_i,   Ā = Σ_i p_i·A_i                          (paper Eqs. 12–13)
    ΔW_res = s·(Σ_i p_i·B_i·A_i − B̄·Ā) = s·Σ_i p_i·B_i·(A_i − Ā)   (Eq. 14, rewritten)
    W0' = W0 + ΔW_res,  clients restart from (B̄, Ā)              (Eqs. 15–16)
    ⇒ W0' + s·B̄·Ā = W0 + Σ_i p_i·s·B_i·A_i                       (exact)

The rewrite uses Σ_i p_i·B_i·Ā = B̄·Ā, so the residual ships exactly as
factors [p_1·s·B_1 … p_K·s·B_K] and [A_1−Ā; …; A_K−Ā]: K·r·(m+n) numbers
instead of m·n. The paper uses uniform weights (``weighting="uniform"``);
data-size weights are the default here. No transpose for nn.Linear: see
:mod:`fedlora.core.fold`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..adapter import Adapter
from ..aggregator import Aggregator, RoundOutput
from ..factored import Factored
from ..registry import register
from ..state import ClientUpdate, ServerState
from ._common import mean_factors, module_adapters, per_module, unzip


def exact_residual(adapters: list[Adapter], p: Tensor, A_mean: Tensor, scale: float) -> Factored:
    """s·Σ_i p_i·B_i·(A_i − Ā) as factors of inner dimension Σ_i r_i."""
    L = torch.cat([float(w) * scale * a.B for w, a in zip(p, adapters)], dim=1)
    R = torch.cat([a.A - A_mean for a in adapters], dim=0)
    return Factored(L, R)


@register
class FedEx(Aggregator):
    name = "fedex"
    exact = True

    def dp_space(self, state: ServerState) -> str:
        return "dense_exact"

    def _aggregate(self, state: ServerState, updates: list[ClientUpdate], p: Tensor) -> RoundOutput:
        def module(name: str) -> tuple[Adapter, Factored]:
            local, g = module_adapters(updates, name), state.adapters[name]
            B, A = mean_factors(local, p)
            return Adapter(B, A, g.scale), exact_residual(local, p, A, g.scale)

        adapters, residual = unzip(per_module(module, state.adapters))
        return RoundOutput(adapters=adapters, base_delta=residual)
