"""FedHL (Peng et al., arXiv 2505.18494): full-rank global basis, unbiased heterogeneous-rank update.

Reconstructed from the abstract and a third-party re-implementation that cites
the paper's Eq. (8) and Eq. (15) (see methods.md §2); the server keeps the
global update W_t untruncated:

    download to client i (rank r_i):   s_i·B_i·A_i = W_t^{r_i}  (top-r_i SVD part, Σ in B)
    truncation error (Eq. 8):          r̂_i = Σ_modules ‖W_t − W_t^{r_i}‖_F² = Σ_{j>r_i} σ_j²
    optimal weights (Eq. 15):          q_i = (p_i/(r̂_i² + ε)) / Σ_j (p_j/(r̂_j² + ε))
    unbiased update:                   W_{t+1} = W_t + Σ_i p_i·(s_i·B_i'·A_i' − W_t^{r_i})

Each client contributes only its own change from the point it started at,
added to the untruncated W_t: directions beyond r_i are not lost because a
low-rank client took part. Round 0 has W_0 = 0, so all r̂_i = 0 and the
weights are the base weights. The raw weights are multiplied by the base weights p_i of
``weighting``: with ``uniform`` this is the paper's rule, with ``data_size`` (fedlora's
default) they are also weighted by examples, as in FedAvg.

W_t is held as a thin SVD. Since W_t^{r_i} = U·diag(1[j<r_i]·σ)·Vᵀ, the
update is U·diag(σ_j·(1 − Σ_i p_i·1[j<r_i]))·Vᵀ + Σ_i p_i·s_i·B_i'·A_i', a
factorisation of inner dimension rank(W_t) + Σ r_i whose first rank(W_t) columns
are already orthonormal: ``plus`` orthogonalises only the clients' part
against them (numerical zeros dropped, ``max_rank`` optional cap). The singular
vectors stay as an orthonormal basis and a small rotation (``BasisSVD``): only the
top r columns that downloads and the clients' starts need are multiplied out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..adapter import split_scales
from ..aggregator import RoundOutput
from ..basis_svd import BasisSVD
from ..factored import Factored
from ..registry import register
from ..state import ClientUpdate, ServerState
from ..weights import normalise
from ._common import per_module
from .flexlora import SVDGlobal, svd_download


@register
class FedHL(SVDGlobal):
    name = "fedhl"
    exact = False
    per_client_info = ("fedhl_weights", "truncation_errors")  # p_i and r̂_i

    def __init__(self, weighting: str = "data_size", eps: float = 1e-6, split: str = "B", rtol: float = 1e-7, max_rank: int | None = None):
        super().__init__(weighting, split, rtol)
        self.eps = eps
        self.max_rank = max_rank

    def truncation_errors(self, state: ServerState, updates: list[ClientUpdate]) -> Tensor:
        """r̂_i = Σ_modules Σ_{j > r_i} σ_j(W_t)², one per client."""
        svds = state.extra["global"]
        return torch.tensor(
            [sum(svds[name].tail_energy(u.adapters[name].rank) for name in svds) for u in updates],
            dtype=torch.float64,
        )

    def _aggregate(self, state: ServerState, updates: list[ClientUpdate], p: Tensor) -> RoundOutput:
        r_hat = self.truncation_errors(state, updates)
        raw = p / (r_hat.square() + self.eps)
        q = normalise(raw, "FedHL", [u.client_id for u in updates])

        def module(name: str) -> BasisSVD:
            g = state.extra["global"][name]
            svd = g if isinstance(g, BasisSVD) else BasisSVD.of(g)
            ranks = torch.tensor([u.adapters[name].rank for u in updates])
            j = torch.arange(svd.rank)
            kept = 1.0 - (q[:, None] * (j[None, :] < ranks[:, None])).sum(0)  # 1 − Σ_i p_i·1[j<r_i]
            # Each client's factors = its start (U's and Vh's own leading directions, scaled as
            # svd_download scaled them) + its change: only the changes need orthogonalising.
            a = svd.rank
            top = svd.truncate(min(int(ranks.max()), a))  # the only singular vectors multiplied out
            # One buffer per side, the clients' blocks written in place (no per-client temporaries).
            (m, n), b = svd.shape, int(ranks.sum())
            dtype = updates[0].adapters[name].B.dtype
            L, R = torch.empty(m, b, dtype=dtype), torch.empty(b, n, dtype=dtype)
            P, E = torch.zeros(a, b, dtype=torch.float64), torch.zeros(a, b, dtype=torch.float64)
            at = 0
            for u, qi in zip(updates, q.tolist()):
                ad = u.adapters[name]
                k, c, cols = min(ad.rank, a), qi * ad.scale, slice(at, at + ad.rank)
                dB, dA = split_scales(top.S[:k], ad.scale, self.split)
                L[:, cols] = ad.B
                R[cols] = ad.A
                L[:, at : at + k].addcmul_(top.U[:, :k], dB, value=-1.0)
                R[at : at + k].addcmul_(dA[:, None], top.Vh[:k], value=-1.0)
                L[:, cols] *= c
                P[torch.arange(k), torch.arange(at, at + k)] = c * dB.double()
                E[torch.arange(k), torch.arange(at, at + k)] = dA.double()
                at += ad.rank
            return svd.plus(svd.S.double() * kept, Factored(L, R), rank=self.max_rank, rtol=self.rtol, in_basis=(P, E))  # W_t's basis reused

        svds = per_module(module, state.extra["global"])
        nxt = state.evolve(round=state.round + 1)
        info = {"fedhl_weights": q.tolist(), "truncation_errors": r_hat.tolist()}
        return RoundOutput(adapters=svd_download(nxt, svds, state.rank, self.split), extra={"global": svds}, info=info)
