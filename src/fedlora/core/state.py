"""What travels each round and what the server keeps between rounds.

One round, per adapted module (all in out×in orientation):

    server ──ClientStart──▶ client i      adapters (B, A) of rank r_i, scaling s_i,
                                           optional client-only base delta, dense params
    server ◀─ClientUpdate── client i      trained (B_i, A_i), n_i, dense params, label counts
    server: Aggregator.aggregate(state, updates) → new ServerState

``ServerState.base_delta`` is the part of the aggregate that the method folds
into the frozen base weights W0 this round (FedEx-LoRA's residual, FLoRA's
stack, …). It is factored: an engine folds it into its single base model once
and sends the same factors to every client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from .adapter import Adapter, LoraSpec
from .factored import Factored

__all__ = ["ClientUpdate", "ClientStart", "SelfPruning", "ServerState"]


@dataclass(frozen=True)
class ClientUpdate:
    """What client ``client_id`` sends after local training."""

    client_id: str
    num_examples: int
    adapters: Mapping[str, Adapter]
    dense: Mapping[str, Tensor] = field(default_factory=dict)
    label_counts: Tensor | None = None  # (C,) examples per class, only if the client opts in
    # Fed-SB: per module the r×r C with B = B_start·C, which travels instead of B and A (the
    # adapters then hold what the server rebuilds from C: ``core.adapter.from_frame``).
    cores: Mapping[str, Tensor] = field(default_factory=dict)

    def numel(self) -> int:
        """Numbers uploaded: r_i·(m+n) per module (r² with cores) plus the dense parameters."""
        factors = sum(c.numel() for c in self.cores.values()) if self.cores else sum(a.numel() for a in self.adapters.values())
        return factors + sum(t.numel() for t in self.dense.values())


@dataclass(frozen=True)
class SelfPruning:
    """HetLoRA's rank self-pruning, done by the client (``core/methods/hetlora.py``): with t = ⌈γ·r⌉,
    λ·Σ_modules ‖B[:, r−t:]·A[r−t:]‖_F is added to the local loss, and when that sum is smaller after
    the round than at its start the client drops the last t components (not below ``min_rank``) and
    sends a rank-(r − t) adapter with the same product, at the scaling ``lora`` gives that rank."""

    gamma: float  # γ: the fraction of the rank in the regularised tail
    strength: float  # λ
    min_rank: int
    lora: LoraSpec


@dataclass(frozen=True)
class ClientStart:
    """What one client downloads before a round: its starting point.

    The client's model is W0 (with every broadcast ``ServerState.base_delta``
    folded in) + ``base_delta`` (client-only, frozen) + s_i·B·A (trainable).
    """

    adapters: Mapping[str, Adapter]
    base_delta: Mapping[str, Factored] = field(default_factory=dict)
    dense: Mapping[str, Tensor] = field(default_factory=dict)
    train_A: bool = True
    train_B: bool = True  # RoLoRA's A-rounds freeze B
    train_core: bool = False  # Fed-SB: B = Q·R with Q an orthonormal basis of the B sent, only the r×r R trains
    keep_local: tuple[str, ...] = ()  # parts the client keeps as its own between rounds ("B", "dense"): FedSA-LoRA
    prune: SelfPruning | None = None  # HetLoRA: regularise the tail and drop it when it shrinks

    def numel(self) -> int:
        return sum(a.numel() for a in self.adapters.values()) + sum(f.numel() for f in self.base_delta.values()) + sum(t.numel() for t in self.dense.values())


@dataclass(frozen=True)
class ServerState:
    """The server's state between rounds. Aggregators never mutate it; they return a new one."""

    round: int
    rank: int  # the global adapter rank r (r_max for mixed-rank methods)
    lora: LoraSpec
    adapters: Mapping[str, Adapter]  # the global adapter clients restart from
    dense: Mapping[str, Tensor] = field(default_factory=dict)  # fully trained params (heads)
    base_delta: Mapping[str, Factored] = field(default_factory=dict)  # to fold into W0 after this round
    extra: Mapping[str, Any] = field(default_factory=dict)  # method state (e.g. FedHL's global W_t)
    info: Mapping[str, Any] = field(default_factory=dict)  # diagnostics of the last aggregation
    seed: int = 0

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {name: a.shape for name, a in self.adapters.items()}

    def evolve(self, **changes: Any) -> ServerState:
        return replace(self, **changes)

    def broadcast_numel(self) -> int:
        """Numbers every client downloads for the shared base-weight delta."""
        return sum(f.numel() for f in self.base_delta.values())
