"""FLoRA (Wang et al., NeurIPS 2024): stacking, merged into the base, re-initialised.

    B_stack = [p_1·s_1·B_1, …, p_K·s_K·B_K]      (m × Σ r_k)
    A_stack = [A_1; …; A_K]                      (Σ r_k × n)
    W0' = W0 + B_stack·A_stack = W0 + Σ_k p_k·s_k·B_k·A_k     (exact, any mix of ranks)

Every client then re-initialises a fresh LoRA (B = 0, A random) at its own
rank (author's confirmation, FederatedLLM#10), so the global adapter's product
is zero and the stack is the whole update. The fresh A comes from a generator
seeded by (seed, round, module): nothing to transport. Download per module:
Σ_k r_k·(m+n), growing with the number of clients.
"""

from __future__ import annotations

from torch import Tensor

from ..adapter import init_adapter, module_generator
from ..aggregator import Aggregator, RoundOutput
from ..registry import register
from ..state import ClientStart, ClientUpdate, ServerState
from ._common import module_adapters, weighted_sum_of_deltas


def fresh_adapters(state: ServerState, round: int, rank: int) -> dict:
    scale = state.lora.scale(rank)
    return {name: init_adapter(shape, rank, scale, module_generator(state.seed, round, name)) for name, shape in state.shapes.items()}


@register
class FLoRA(Aggregator):
    name = "flora"
    exact = True
    mixed_ranks = True

    def client_start(self, state: ServerState, rank: int | None = None) -> ClientStart:
        rank = self.client_rank(state, rank)
        return ClientStart(adapters=fresh_adapters(state, state.round, rank), dense=dict(state.dense))

    def _max_client_rank(self, state: ServerState) -> int | None:
        return None

    def _aggregate(self, state: ServerState, updates: list[ClientUpdate], p: Tensor) -> RoundOutput:
        stack = {name: weighted_sum_of_deltas(module_adapters(updates, name), p) for name in state.adapters}
        return RoundOutput(adapters=fresh_adapters(state, state.round + 1, state.rank), base_delta=stack)
