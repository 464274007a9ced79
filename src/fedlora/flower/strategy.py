"""A Flower Strategy that runs any fedlora aggregation method.

It owns no round logic: ``configure_train`` asks the shared
:class:`~fedlora.engine.server.Server` for the round's jobs and sends one
message per sampled client (its own rank r_i, its starting point, the base
deltas its node has not folded yet); ``aggregate_train`` turns the replies
into :class:`~fedlora.core.ClientUpdate` s and hands them to ``Server.finish``,
which aggregates with the core, folds, evaluates and checkpoints exactly as
the in-process engine does.

Failures. A client whose reply carries an error, does not arrive within the
round's timeout, cannot be decoded, or fails the core's validation is dropped
from that round with its reason logged; the aggregation weights p_i then
renormalise over the clients that finished, so exact methods stay exact over
them (Σ_{i∈done} p_i B_i A_i).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..core import Factored, ServerState
from ..core.errors import AggregationError
from ..engine.server import ClientJob, ClientResult, Server
from .records import MalformedRecord, decode_update, encode_broadcast, encode_start

__all__ = ["FedLoraStrategy"]

log = logging.getLogger("fedlora")


class FedLoraStrategy(Strategy):
    """fedlora's rounds over a Flower Grid.

    ``nodes`` maps each partition id (client index) to the node holding it.
    ``state`` is the server state to start from (round 0, or a checkpoint's).
    """

    def __init__(self, server: Server, state: ServerState, nodes: dict[int, int], *, folded: dict[str, Factored] | None = None):
        self.server = server
        self.state = state
        self.nodes = nodes
        # Base deltas by the rounds they cover; a resumed server starts with one
        # snapshot of everything folded before it stopped.
        self.history: dict[tuple[int, int], dict[str, Factored]] = {}
        if state.round > 0 and folded:
            self.history[(1, state.round)] = dict(folded)
        self.synced: dict[int, int] = {}  # node → last round whose base delta it acknowledged
        self._jobs: list[ClientJob] = []
        self._sent_bytes: dict[int, int] = {}  # node → array bytes of this round's train message
        self._t0 = 0.0

    def summary(self) -> None:
        cfg = self.server.cfg
        log.info("fedlora %s on %d nodes: %d rounds, fraction %.2f", cfg.fed.method, len(self.nodes), cfg.fed.rounds, cfg.fed.fraction)

    # ---------------------------------------------------------------- training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._jobs = self.server.plan(self.state)
        messages = []
        for job in self._jobs:
            node = self.nodes[job.index]
            content = encode_start(job.start, round=job.round, partition_id=job.index, rank=job.client.rank,
                                   seed=job.seed, send_label_counts=job.send_label_counts)
            since = self.synced.get(node, 0)
            encode_broadcast(content, {span: d for span, d in self.history.items() if span[1] > since})
            self._sent_bytes[node] = _array_bytes(content)
            messages.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        self._t0 = time.perf_counter()
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = {m.metadata.src_node_id: m for m in replies}
        train_s = time.perf_counter() - self._t0
        results = [self._result(job, replies.get(self.nodes[job.index])) for job in self._jobs]
        self.state = self.server.finish(self.state, self._jobs, results, train_s)
        if self.state.base_delta:
            self.history[(self.state.round, self.state.round)] = dict(self.state.base_delta)
        row = self.server.rounds[-1]
        metrics = MetricRecord({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        adapters = ArrayRecord({f"{m}/{p}": t.float() for m, a in self.state.adapters.items() for p, t in (("B", a.B), ("A", a.A))})
        return adapters, metrics

    def _result(self, job: ClientJob, reply: Message | None) -> ClientResult:
        node = self.nodes[job.index]
        if reply is None:
            return ClientResult(error=f"no reply from node {node} within {self.server.cfg.fed.client_timeout:g} s")
        if reply.has_error():
            return ClientResult(error=f"node {node} failed: {reply.error.reason} (code {reply.error.code})")
        try:
            update, stats = decode_update(reply.content, job.client.client_id)
            self.server.exp.aggregator.validate(self.state, [update])
        except (MalformedRecord, AggregationError) as e:
            return ClientResult(error=f"node {node} sent a bad update: {e}")
        self.synced[node] = job.round - 1  # it folded every base delta before this round
        return ClientResult(update=update, stats=stats,
                            wire={"wire_bytes_down": self._sent_bytes[node], "wire_bytes_up": _array_bytes(reply.content)})

    # -------------------------------------------- evaluation: on the server, in finish
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def _array_bytes(content) -> int:
    """Serialised bytes of a message's arrays (numpy headers and keys included)."""
    return sum(rec.count_bytes() for rec in content.array_records.values())
