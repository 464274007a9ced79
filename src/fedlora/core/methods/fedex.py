"""FedEx-LoRA (Singhal et al., ACL 2025): exact aggregation, residual folded into W0.

    B̄ = Σ_i p_i·B_i,   Ā = Σ_i p_i·A_i                          (paper Eqs. 12–13)
    ΔW_res = s·(Σ_i p_i·B_i·A_i − B̄·Ā) = s·Σ_i p_i·B_i·(A_i − Ā)   (Eq. 14, rewritten)
    W0' = W0 + ΔW_res,  clients restart from (B̄, Ā)              (Eqs. 15–16)
    ⇒ W0' + s·B̄·Ā = W0 + Σ_i p_i·s·B_i·A_i                       (exact)

The rewrite uses Σ_i p_i·B_i·Ā = B̄·Ā, and Σ_i p_i·(A_i − Ā) = 0 lets one client j
drop out: the residual ships exactly as factors [p_i·s·(B_i − B_j)]_{i≠j} and
[A_i − Ā]_{i≠j}, (K−1)·r·(m+n) numbers instead of m·n. The paper uses uniform weights (``weighting="uniform"``);
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
    """s·Σ_i p_i·B_i·(A_i − Ā) = s·Σ_{i≠j} p_i·(B_i − B_j)·(A_i − Ā), inner dimension (K−1)·r.

    Σ_i p_i·(A_i − Ā) = 0, so subtracting B_j from every B_i changes nothing and the pivot j's
    own term vanishes: one client's worth of columns fewer to ship and to fold (10% at K = 10),
    and no cancellation between the large terms B_i·(A_i − Ā) that the sum leaves to round-off.
    The pivot is the client of largest weight."""
    if len(adapters) == 1:
        a = adapters[0]
        return Factored(float(p[0]) * scale * a.B, a.A - A_mean)
    j = int(torch.argmax(p))
    others = [(float(w), a) for i, (w, a) in enumerate(zip(p, adapters)) if i != j]
    (m, n), r, Bj = adapters[j].shape, adapters[j].rank, adapters[j].B
    L, R = Bj.new_empty(m, len(others) * r), Bj.new_empty(len(others) * r, n)
    for i, (w, a) in enumerate(others):
        cols = slice(i * r, (i + 1) * r)
        torch.sub(a.B, Bj, out=L[:, cols]).mul_(w * scale)
        torch.sub(a.A, A_mean, out=R[cols])
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
