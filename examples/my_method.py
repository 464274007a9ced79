"""A method of your own, run by ``fed.method=examples/my_method.py:SVDFold`` (or as
``package.module:SVDFold``, or registered under the entry-point group ``fedlora.methods``).

    ΔW = Σ_i p_i·s_i·B_i·A_i                       the exact mean of the clients' products
    ΔW = U·Σ·Vᵀ:  s·B'·A' = U_r·Σ_r·V_rᵀ          the best rank-r part becomes the adapters
    W0 ← W0 + (ΔW − U_r·Σ_r·V_rᵀ)                   the rest is folded into W0: exact

Like FedEx-LoRA it is exact; unlike it, the adapters clients restart from are the best
rank-r approximation of the global update rather than the mean factors.
"""

from fedlora.core import Aggregator, Factored
from fedlora.core.adapter import adapter_from_svd, module_generator
from fedlora.core.aggregator import RoundOutput


class SVDFold(Aggregator):
    name = "svdfold"
    exact = True

    def _aggregate(self, state, updates, p):
        adapters, base_delta = {}, {}
        for name, g in state.adapters.items():
            mean = Factored.stack([u.adapters[name].delta() for u in updates], p.tolist())  # never m×n
            svd = mean.svd()
            fresh = module_generator(state.seed, state.round + 1, name)  # fills components a rank-deficient ΔW lacks
            adapters[name] = adapter_from_svd(svd, state.rank, g.scale, "sqrt", fresh)
            base_delta[name] = svd.tail(state.rank).factored()
        return RoundOutput(adapters=adapters, base_delta=base_delta)
