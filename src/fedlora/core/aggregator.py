"""The interface every aggregation method implements, and the registry by name.

A method is a small subclass of :class:`Aggregator` in ``fedlora.core.methods``
that implements ``_aggregate`` (and, for per-client downloads, ``client_start``).
Validation, client weights and dense-parameter averaging are done once, here,
for all methods; a method sees only well-formed updates and weights p_i.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .adapter import Adapter, LoraSpec, init_adapter, module_generator
from .dense import clone_dense, weighted_average
from .errors import AggregationError, UpdateError
from .factored import Factored
from .state import ClientStart, ClientUpdate, ServerState
from .validate import validate_updates
from .weights import WEIGHTINGS, base_weights

__all__ = ["Aggregator", "RoundOutput"]


@dataclass
class RoundOutput:
    """What a method's ``_aggregate`` returns for one round."""

    adapters: dict[str, Adapter]
    base_delta: dict[str, Factored] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    dense: dict[str, Tensor] | None = None  # None: the plain weighted average


class Aggregator(ABC):
    """Server-side aggregation of one round of LoRA updates.

    Subclasses set ``name``, ``exact`` (after aggregation W0' + G' equals
    W0 + Σ_i p_i·ΔW_i, ΔW_i a client's effective update, G the global delta)
    and ``mixed_ranks`` (whether clients may use ranks below the global one).
    """

    name: ClassVar[str]
    exact: ClassVar[bool]
    mixed_ranks: ClassVar[bool] = False
    local_dp: ClassVar[bool] = True  # whether its clients can train under DP-SGD (privacy.mode=local)
    # Keys of ``info`` holding one number per client, in the order of ``info["clients"]``; the
    # engines write them beside each client's row of clients.jsonl. Every method has "weights",
    # the base weights p_i.
    per_client_info: ClassVar[tuple[str, ...]] = ()

    def __init__(self, weighting: str = "data_size"):
        if weighting not in WEIGHTINGS:
            raise AggregationError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
        self.weighting = weighting

    # ------------------------------------------------------------- lifecycle
    def init_state(
        self,
        shapes: Mapping[str, tuple[int, int]],
        rank: int,
        lora: LoraSpec = LoraSpec(),  # noqa: B008  (frozen dataclass: an immutable default)
        dense: Mapping[str, Tensor] | None = None,
        seed: int = 0,
    ) -> ServerState:
        """Round 0: every module gets peft's default init (A random, B = 0) at the global rank."""
        if rank < 1:
            raise AggregationError(f"global LoRA rank must be ≥ 1, got {rank}")
        for name, (m, n) in shapes.items():
            if rank > min(m, n):
                raise AggregationError(f"module {name!r}: rank {rank} exceeds min(out, in) = {min(m, n)}")
        scale = lora.scale(rank)
        adapters = {name: init_adapter(shape, rank, scale, module_generator(seed, 0, name)) for name, shape in shapes.items()}
        state = ServerState(round=0, rank=rank, lora=lora, adapters=adapters, dense=clone_dense(dense or {}), seed=seed)
        return state.evolve(extra=self._init_extra(state))

    def _init_extra(self, state: ServerState) -> dict[str, Any]:
        return {}

    def client_start(self, state: ServerState, rank: int | None = None) -> ClientStart:
        """The starting point sent to a client of LoRA rank ``rank`` (default: the global rank).

        Tensors are copies: a client training in place cannot touch the server state.
        """
        rank = self.client_rank(state, rank)
        return ClientStart(adapters={n: a.clone() for n, a in state.adapters.items()}, dense=clone_dense(state.dense))

    def assigned_rank(self, state: ServerState, client_id: str, rank: int) -> int:
        """The rank client ``client_id`` (configured at ``rank``) trains at next round: ``rank``, except
        for methods whose clients change it (HetLoRA's self-pruning)."""
        return rank

    def client_rank(self, state: ServerState, rank: int | None) -> int:
        """``rank`` checked against what this method accepts (None = the global rank)."""
        rank = state.rank if rank is None else rank
        if self.mixed_ranks:
            limit = self._max_client_rank(state)
            if rank < 1 or (limit is not None and rank > limit):
                raise AggregationError(f"method {self.name!r}: client rank {rank} must be between 1 and {limit or 'any'}")
        elif rank != state.rank:
            raise AggregationError(f"method {self.name!r} needs every client at the global rank {state.rank}, got {rank}")
        return rank

    def global_delta(self, state: ServerState) -> dict[str, Factored]:
        """G: the global model's update on top of the (folded) base weights."""
        return {name: a.delta() for name, a in state.adapters.items()}

    # ------------------------------------------------------------ aggregation
    def validate(self, state: ServerState, updates: Sequence[ClientUpdate]) -> None:
        """Raise :class:`UpdateError` / :class:`AggregationError` on the first problem
        (what :meth:`aggregate` checks first). Transports call it per update to drop a
        bad client instead of failing the round."""
        validate_updates(
            state,
            updates,
            same_rank=not self.mixed_ranks,
            max_rank=self._max_client_rank(state),
            needs_label_counts=self._needs_label_counts(),
        )

    def aggregate(self, state: ServerState, updates: Sequence[ClientUpdate]) -> ServerState:
        """Validate, weight and aggregate one round; returns a new state (``state`` is untouched)."""
        self.validate(state, updates)
        try:
            return self._aggregate_valid(state, updates)
        except UpdateError:
            raise
        except (ArithmeticError, RuntimeError, ValueError) as e:  # torch.linalg errors are RuntimeErrors
            raise self._culprit(state, updates, e) from e

    def _aggregate_valid(self, state: ServerState, updates: Sequence[ClientUpdate]) -> ServerState:
        p = base_weights(updates, self.weighting)
        out = self._aggregate(state, list(updates), p)
        dense = out.dense if out.dense is not None else weighted_average(updates, p)
        info = {"clients": [u.client_id for u in updates], "weights": p.tolist(), **out.info}
        new = state.evolve(
            round=state.round + 1,
            adapters=out.adapters,
            base_delta=out.base_delta,
            extra=out.extra,
            info=info,
            dense=dense if updates[0].dense else dict(state.dense),
        )
        _check_finite(new)
        return new

    def _culprit(self, state: ServerState, updates: Sequence[ClientUpdate], error: Exception) -> AggregationError:
        """Name the client an aggregation failure comes from: the first whose update alone
        fails too (probed only after a failure, so a good round pays nothing). The engines drop
        that client and aggregate the others."""
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        for u in updates:
            try:
                self._aggregate_valid(state, [u])
            except (ArithmeticError, RuntimeError, ValueError):
                return UpdateError(u.client_id, None, f"aggregating its update fails ({problem})")
        return AggregationError(f"aggregating {[u.client_id for u in updates]} together fails, each alone does not: {problem}")

    def dp_space(self, state: ServerState) -> str | None:
        """Where client-level DP clips and noises this method's updates in this round
        (``core/privacy.py``: factors, B, dense, dense_exact), or None: no DP mechanism."""
        return None

    def private_adapters(self, state: ServerState, adapters: dict[str, Adapter]) -> dict[str, Adapter]:
        """The adapters a client-level DP round releases, from the noised ones its ``dp_space``
        gave (``core/privacy.py``): the method's own step after the mean, if it has one. Anything
        computed from the noised release and the public state is post-processing and keeps the
        guarantee. By default the noised adapters as they are."""
        return adapters

    def private_extra(self, state: ServerState, new: ServerState) -> dict[str, Any]:
        """The method's ``extra`` after a client-level DP round (``core/privacy.py``), which
        replaces ``_aggregate``: by default what it was."""
        return dict(state.extra)

    def _max_client_rank(self, state: ServerState) -> int | None:
        return state.rank

    def _needs_label_counts(self) -> bool:
        return False

    @abstractmethod
    def _aggregate(self, state: ServerState, updates: list[ClientUpdate], p: Tensor) -> RoundOutput:
        """The method itself: updates are valid, p (float64) sums to one."""


def _check_finite(state: ServerState) -> None:
    """Refuse a new state holding NaN or Inf (an update finite alone can still overflow a sum)."""
    tensors = [(f"adapter {n}", t) for n, a in state.adapters.items() for t in (a.B, a.A)]
    tensors += [(f"base delta {n}", t) for n, f in state.base_delta.items() for t in (f.L, f.R)]
    tensors += [(f"dense {n}", t) for n, t in state.dense.items()]
    for what, t in tensors:
        # min and max propagate NaN and are ±Inf if any element is: one pass, no boolean temporary.
        if t.numel() and not all(bool(torch.isfinite(v)) for v in torch.aminmax(t)):
            raise FloatingPointError(f"the aggregate's {what} is not finite")
