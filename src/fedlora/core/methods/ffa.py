"""FFA-LoRA (Sun et al., ICLR 2024): A frozen and shared, only B trained.

    A' = A (the round-0 random init, identical on every client),   B' = Σ_i p_i·B_i

Exact: Σ_i p_i·s·B_i·A = s·(Σ_i p_i·B_i)·A. Clients are told not to train A
(``ClientStart.train_A = False``); an update whose A differs from the global A
is refused, because averaging B alone would then silently be inexact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..adapter import Adapter
from ..aggregator import Aggregator, RoundOutput
from ..errors import UpdateError
from ..registry import register
from ..state import ClientStart, ClientUpdate, ServerState
from ._common import mean_factors, module_adapters, per_module


def check_frozen_A(state: ServerState, updates: list[ClientUpdate], rtol: float) -> None:
    """Refuse an update whose A moved away from the shared global A."""

    def module(name: str) -> None:
        g = state.adapters[name]
        for u in updates:
            A = u.adapters[name].A
            if torch.equal(A, g.A):  # the usual case, one pass and no temporaries
                continue
            if not torch.allclose(A, g.A.to(A.dtype), rtol=rtol, atol=rtol * float(g.A.abs().max())):
                drift = float((A - g.A).norm() / g.A.norm().clamp_min(1e-30))
                raise UpdateError(u.client_id, name, f"A was changed (relative change {drift:.2e}); A is frozen in this round")

    per_module(module, state.adapters)


def average_B(state: ServerState, updates: list[ClientUpdate], p: Tensor) -> dict[str, Adapter]:
    """B' = Σ p_i·B_i on the shared A of every module."""

    def module(name: str) -> Adapter:
        g = state.adapters[name]
        B, _ = mean_factors(module_adapters(updates, name), p)
        return Adapter(B, g.A, g.scale)

    return per_module(module, state.adapters)


@register
class FFA(Aggregator):
    name = "ffa"
    exact = True

    def __init__(self, weighting: str = "data_size", frozen_rtol: float = 1e-6):
        super().__init__(weighting)
        self.frozen_rtol = frozen_rtol

    def client_start(self, state: ServerState, rank: int | None = None) -> ClientStart:
        start = super().client_start(state, rank)
        return ClientStart(adapters=start.adapters, dense=start.dense, train_A=False)

    def dp_space(self, state: ServerState) -> str:
        return "B"

    def _aggregate(self, state: ServerState, updates: list[ClientUpdate], p: Tensor) -> RoundOutput:
        check_frozen_A(state, updates, self.frozen_rtol)
        return RoundOutput(adapters=average_B(state, updates, p))
