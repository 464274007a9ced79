"""Fed-SB (Singhal, Ponkshe, Vartak, Varshney, Vepakomma; arXiv 2502.15436): LoRA-SB's
W = W0 + s·B·R·A with B and A fixed and shared, only the r×r matrix R trained; the server averages R.

    round 1 (the initialisation): clients train ordinary LoRA (B, A) from peft's init, and the
        server splits the exact aggregate M = Σ_i p_i·s·B_i·A_i by its top-r SVD M_r = U·Σ·Vᵀ:
            B_fix = U (orthonormal columns),  A_fix = Vᵀ (orthonormal rows),  R_1 = Σ/s,
            W0 ← W0 + (M − M_r)                    (the rest, as FedEx-LoRA's residual: exact, once)
    round t ≥ 2: each client trains R only, from R_t:   B_i = U·R_i,  A_i = Vᵀ
            R̄ = Σ_i p_i·R_i   ⇒   s·U·R̄·Vᵀ = Σ_i p_i·s·B_i·A_i          (exact: U and Vᵀ are shared)

LoRA-SB takes its frames from an SVD of an approximate first full fine-tuning step computed on
the training data (the public code estimates it on the pooled data before federating). A server
holds no data, so here the clients take that first step: one round of LoRA, aggregated exactly.

The server's adapter holds B = U·R (m×r) and A = Vᵀ, so validation, weights and checkpoints
work unchanged. A client trains R in the parametrisation B = Q·R' (Q an orthonormal
basis of the B it receives, which spans U's columns while R is invertible;
``FedModel.B_in_span``), so an Adam step on R' differs from one on R only by a fixed rotation of
R's rows. The server refuses an update whose A moved or whose B left span(U). Client-level DP: round 1
as FedEx-LoRA's, then Gaussian noise on R only (``core/privacy.py``, space ``core``).

Traffic: the paper sends R, r² numbers per module each way, the frames being fixed. Upload here:
r² per module too, the client's C with B_i = B_t·C_i (``ClientUpdate.cores``; B_t, the B it was
sent, is known to the server, which rebuilds B_i = B_t·C_i in float64, ``core.adapter.from_frame``;
the rebuilt B differs from the trained one by round-off times cond(R_t)). Download: B_t = U·R_t and
A, r·(m+n) per module (FFA-LoRA's size), since a client sampled for the first time needs the frames.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..adapter import Adapter, adapter_from_svd, module_generator
from ..aggregator import Aggregator, RoundOutput
from ..errors import AggregationError, UpdateError
from ..registry import register
from ..state import ClientStart, ClientUpdate, ServerState
from ._common import mean_factors, module_adapters, per_module, unzip, weighted_sum_of_deltas
from .ffa import check_frozen_A


@register
class FedSB(Aggregator):
    name = "fedsb"
    exact = True
    local_dp = False  # R is trained through a parametrisation Opacus's per-example hooks do not see

    split = "B"  # round 1 (and its DP form): B = U·Σ/s, A = Vᵀ with orthonormal rows

    def __init__(self, weighting: str = "data_size", frozen_rtol: float = 1e-6, span_rtol: float = 1e-3):
        super().__init__(weighting)
        if not 0 < span_rtol < 1:
            raise ValueError(f"span_rtol must be in (0, 1), got {span_rtol}")
        self.frozen_rtol = frozen_rtol
        self.span_rtol = span_rtol

    @staticmethod
    def initialised(state: ServerState) -> bool:
        return "frame" in state.extra

    def client_start(self, state: ServerState, rank: int | None = None) -> ClientStart:
        start = super().client_start(state, rank)
        if not self.initialised(state):  # round 1: ordinary LoRA, the step the frames come from
            return start
        return ClientStart(adapters=start.adapters, dense=start.dense, train_A=False, train_core=True)

    def dp_space(self, state: ServerState) -> str:
        """Client-level DP: round 1 as FedEx-LoRA (noised mean of the products, top r into the
        adapters, the rest into W0), then noise on R only (``core``: r² numbers per module)."""
        return "core" if self.initialised(state) else "dense_exact"

    def private_extra(self, state: ServerState, new: ServerState) -> dict:
        if self.initialised(state):
            return dict(state.extra)
        # the DP first round's B = U·Σ/s: U is B with unit columns (Σ > 0: the noised mean has full rank)
        return {"frame": {n: a.B / a.B.norm(dim=0).clamp_min(torch.finfo(a.B.dtype).tiny) for n, a in new.adapters.items()}}

    def _aggregate(self, state: ServerState, updates: list[ClientUpdate], p: Tensor) -> RoundOutput:
        if not self.initialised(state):
            return self._initialise(state, updates, p)
        check_frozen_A(state, updates, self.frozen_rtol)
        frame = state.extra["frame"]

        def module(name: str) -> Adapter:
            g = state.adapters[name]
            # The span of the B the clients were sent, B_t = U·R_t as the server holds it: a client's
            # B_i = B_t·C_i lies in it exactly. (U itself is no reference once B_t is rounded for the
            # wire: a bf16 B_t is ≈ 1e-3 of ‖B‖ off span(U).)
            U = _column_basis(g.B)
            local = module_adapters(updates, name)
            for u, a in zip(updates, local):
                off = float((a.B.double() - U @ (U.T @ a.B.double())).norm())
                if off > self.span_rtol * float(a.B.norm()):
                    raise UpdateError(
                        u.client_id, name, f"B left Fed-SB's fixed column space (off by {off / float(a.B.norm()):.1e} of ‖B‖); only R in B = U·R trains"
                    )
            B, _ = mean_factors(local, p)  # U·Σ p_i·R_i
            return Adapter(B, g.A, g.scale)

        return RoundOutput(adapters=per_module(module, state.adapters), extra={"frame": frame})

    def _initialise(self, state: ServerState, updates: list[ClientUpdate], p: Tensor) -> RoundOutput:
        r = state.rank

        def module(name: str):
            svd = weighted_sum_of_deltas(module_adapters(updates, name), p).svd(rtol=1e-7)
            if svd.rank < r:
                raise AggregationError(
                    f"Fed-SB: module {name!r}: the first round's aggregate has rank {svd.rank} < r = {r}, too few directions to fix the frames (did the clients train?)"
                )
            gen = module_generator(state.seed, state.round + 1, name)
            return adapter_from_svd(svd, r, state.adapters[name].scale, "B", gen), svd.tail(r).factored(), svd.U[:, :r].contiguous()

        adapters, residual, frame = unzip(per_module(module, state.adapters))
        return RoundOutput(adapters=adapters, base_delta=residual, extra={"frame": frame}, info={"fedsb": "initialised"})


def _column_basis(B: Tensor) -> Tensor:
    """Orthonormal float64 columns spanning B's numerical column space (σ > 1e-7·σ₁)."""
    U, S, _ = torch.linalg.svd(B.double(), full_matrices=False)
    return U[:, : int((S > 1e-7 * S[0]).sum())] if S.numel() and S[0] > 0 else U[:, :0]
