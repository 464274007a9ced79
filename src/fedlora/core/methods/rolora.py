"""RoLoRA (arXiv 2409.02346): alternating optimisation, one factor per round.

    round t even:  A frozen and shared, clients train B      B' = Σ_i p_i·B_i,  A' = A
    round t odd:   B frozen and shared, clients train A      A' = Σ_i p_i·A_i,  B' = B

Exact every round, since the factor that is not averaged is the same on every client:
Σ_i p_i·s·B_i·A = s·(Σ_i p_i·B_i)·A, and likewise for A. Half the trainable parameters per
round; an update that changed the frozen factor is refused. (The paper's clients upload only
the trained factor; fedlora's transport still carries both, the frozen one unchanged.)
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


@register
class RoLoRA(Aggregator):
    name = "rolora"
    exact = True

    def __init__(self, weighting: str = "data_size", frozen_rtol: float = 1e-6):
        super().__init__(weighting)
        self.frozen_rtol = frozen_rtol

    @staticmethod
    def trains_B(state: ServerState) -> bool:
        return state.round % 2 == 0

    def client_start(self, state: ServerState, rank: int | None = None) -> ClientStart:
        start = super().client_start(state, rank)
        b = self.trains_B(state)
        return ClientStart(adapters=start.adapters, dense=start.dense, train_A=not b, train_B=b)

    def _aggregate(self, state: ServerState, updates: list[ClientUpdate], p: Tensor) -> RoundOutput:
        b = self.trains_B(state)
        frozen = "A" if b else "B"

        def module(name: str) -> Adapter:
            local, g = module_adapters(updates, name), state.adapters[name]
            for u, a in zip(updates, local):
                mine, theirs = getattr(a, frozen), getattr(g, frozen)
                if torch.equal(mine, theirs):
                    continue
                if not torch.allclose(mine, theirs.to(mine.dtype), rtol=self.frozen_rtol, atol=self.frozen_rtol * float(theirs.abs().max())):
                    raise UpdateError(u.client_id, name, f"{frozen} was changed; {frozen} is frozen in this round (RoLoRA trains {'B' if b else 'A'})")
            B, A = mean_factors(local, p)
            return Adapter(B, g.A, g.scale) if b else Adapter(g.B, A, g.scale)

        return RoundOutput(adapters=per_module(module, state.adapters), info={"rolora_trained": "B" if b else "A"})
