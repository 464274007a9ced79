"""FedSA-LoRA (ICLR 2025): share A, keep B (and the head) on each client.

    A' = Σ_i p_i·A_i              the server averages the A's only
    B_i, θ_i                      stay with client i: it restarts each round from its own
                                  B_i and head θ_i and the new shared A'

A personalised method: there is no global model (the server's B and head stay at their
initialisation, so its "global" metrics describe W0 plus nothing learned). What FedSA-LoRA
reports, and what fedlora reports for it, is each client's own model (A', B_i, θ_i) on a
held-out split of that client's data (``fed.personal_eval``), averaged with weights by the
split's size: the ``personal_*`` columns. Clients upload A only (B and the head they send
back are the unchanged start values); their own B and head live on the client (the in-process
engine keeps them per simulated client, a Flower node in its ``context.state``), survive
checkpoints, and are lost with a node that restarts.
"""

from __future__ import annotations

from torch import Tensor

from ..adapter import Adapter
from ..aggregator import Aggregator, RoundOutput
from ..registry import register
from ..state import ClientStart, ClientUpdate, ServerState
from ._common import mean_factors, module_adapters


@register
class FedSALoRA(Aggregator):
    name = "fedsa"
    exact = False  # no global model to be exact about

    def client_start(self, state: ServerState, rank: int | None = None) -> ClientStart:
        start = super().client_start(state, rank)
        return ClientStart(adapters=start.adapters, dense=start.dense, keep_local=("B", "dense"))

    def _aggregate(self, state: ServerState, updates: list[ClientUpdate], p: Tensor) -> RoundOutput:
        adapters: dict[str, Adapter] = {}
        for name, g in state.adapters.items():
            _, A = mean_factors(module_adapters(updates, name), p)
            adapters[name] = Adapter(g.B.clone(), A, g.scale)
        return RoundOutput(adapters=adapters, dense=dict(state.dense), info={"personalised": 1})
