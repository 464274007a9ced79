"""FlexLoRA (Bai et al., NeurIPS 2024): exact aggregate, SVD redistribution to each client's rank.

    ΔW = Σ_i p_i·s_i·B_i·A_i = U·Σ·Vᵀ                       (global model, kept exactly)
    client k (rank r_k):  B_k = U_{r_k}·Σ_{r_k} / s_k,   A_k = V_{r_k}ᵀ

The server keeps ΔW as its thin SVD (rank ≤ Σ_i r_i, numerical zeros
dropped), computed from the stacked factors. The global model is exact; each
client starts from its rank-r_k truncation, which biases low-rank clients
(the bias FedHL removes). Components a truncation lacks (round 0: ΔW = 0)
are filled with a fresh peft init (B = 0), so the product is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ..adapter import adapter_from_svd, module_generator
from ..aggregator import Aggregator, RoundOutput
from ..basis_svd import BasisSVD
from ..factored import SVD, Factored
from ..registry import register
from ..state import ClientStart, ClientUpdate, ServerState
from ._common import module_adapters, per_module, weighted_sum_of_deltas


def svd_download(state: ServerState, svds: Mapping[str, SVD | BasisSVD], rank: int, split: str) -> dict:
    """Every module's rank-``rank`` adapter whose product is the top-``rank`` part of its SVD."""
    scale = state.lora.scale(rank)
    return {name: adapter_from_svd(svd, rank, scale, split, module_generator(state.seed, state.round, name, f"r{rank}")) for name, svd in svds.items()}


def zero_svds(state: ServerState) -> dict[str, SVD]:
    return {name: Factored.zeros(*shape, dtype=state.adapters[name].B.dtype).svd() for name, shape in state.shapes.items()}


class SVDGlobal(Aggregator):
    """Base of the methods whose server keeps the global update untruncated, as a thin
    SVD in ``extra["global"]``, and sends each client its rank-r_i truncation."""

    mixed_ranks = True

    def __init__(self, weighting: str = "data_size", split: str = "B", rtol: float = 1e-7):
        super().__init__(weighting)
        if split not in ("B", "sqrt"):
            raise ValueError(f"split must be 'B' or 'sqrt', got {split!r}")
        self.split = split
        self.rtol = rtol

    def _init_extra(self, state: ServerState) -> dict:
        return {"global": zero_svds(state)}

    def client_start(self, state: ServerState, rank: int | None = None) -> ClientStart:
        rank = self.client_rank(state, rank)
        return ClientStart(adapters=svd_download(state, state.extra["global"], rank, self.split), dense=dict(state.dense))

    def global_delta(self, state: ServerState) -> dict[str, Factored]:
        return {name: svd.factored() for name, svd in state.extra["global"].items()}


@register
class FlexLoRA(SVDGlobal):
    name = "flexlora"
    exact = True

    def _aggregate(self, state: ServerState, updates: list[ClientUpdate], p: Tensor) -> RoundOutput:
        svds = per_module(lambda name: weighted_sum_of_deltas(module_adapters(updates, name), p).svd(rtol=self.rtol), state.adapters)
        nxt = state.evolve(round=state.round + 1)
        return RoundOutput(adapters=svd_download(nxt, svds, state.rank, self.split), extra={"global": svds})
