"""A Flower Strategy that runs any fedlora aggregation method.

It owns no round logic: ``configure_train`` asks the shared
:class:`~fedlora.engine.server.Server` for the round's jobs and sends one
message per sampled client (its own rank r_i, its starting point, the base
deltas its node has not folded yet); ``aggregate_train`` turns the replies
into :class:`~fedlora.core.ClientUpdate` s and hands them to ``Server.finish``,
which aggregates with the core, folds, evaluates and checkpoints exactly as
the in-process engine does.

Failures. A client whose reply carries an error (the ClientApp raised, or the
SuperLink answers for a node that went offline), does not arrive within the
round's timeout, cannot be decoded, or fails the core's validation is dropped
from that round with its reason; the aggregation weights p_i then renormalise
over the clients that finished, so exact methods stay exact over them
(Σ_{i∈done} p_i B_i A_i). Replies are matched to jobs by the id of the message
they answer, never by their sender: the SuperLink itself (node 0) answers for
a node that died.

Nodes that come back. Before every round the strategy asks the Grid which
nodes are online. A node it has not seen (a SuperNode restarted without
authentication gets a new id) is asked which partition it holds and takes that
partition over; the node it replaces is not used again. A node that lost its
state (restarted with the same id, as authenticated SuperNodes are) answers
with the last round it folded; it is sent, at once and with a full timeout of
its own, every base delta since then (one snapshot Σ_t ΔW0_t when it has none).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from ..core import Factored, ServerState
from ..core.bandwidth import TRANSPORTS
from ..core.errors import AggregationError
from ..engine.server import ClientJob, ClientResult, Server
from .records import MalformedRecord, decode_resync, decode_scores, decode_update, encode_broadcast, encode_start
from .roll_call import ask_partitions

__all__ = ["FedLoraStrategy"]

log = logging.getLogger("fedlora")


class FedLoraStrategy(Strategy):
    """fedlora's rounds over a Flower Grid.

    ``nodes`` maps each partition id (client index) to the node holding it.
    ``state`` is the server state to start from (round 0, or a checkpoint's).
    ``timeout`` bounds each round's wait for replies (``fed.client_timeout``).
    """

    def __init__(self, server: Server, state: ServerState, nodes: dict[int, int], *, folded: dict[str, Factored] | None = None, timeout: float | None = None):
        self.server = server
        self.state = state
        self.nodes = dict(nodes)
        self.timeout = float(server.cfg.fed.client_timeout if timeout is None else timeout)
        # Base deltas by the rounds they cover; a resumed server starts with one
        # snapshot of everything folded before it stopped.
        self.history: dict[tuple[int, int], dict[str, Factored]] = {}
        if state.round > 0 and folded:
            self.history[(1, state.round)] = dict(folded)
        self.synced: dict[int, int] = {}  # node → last round whose base delta it acknowledged
        self.pruned = 0  # history no longer holds rounds 1..pruned: every node had folded them
        self.strangers: set[int] = set()  # online nodes never to use: replaced, or holding no partition of this run
        self.poll_s = 1.0  # how often a round asks the Grid for replies
        self._grid: Grid | None = None
        self._jobs: list[ClientJob] = []
        self._messages: list[tuple[Message, ClientJob]] = []  # this round's train messages (resends included)
        self._bytes_down: dict[int, int] = {}  # partition → array bytes sent to its node this round
        self._bytes_up: dict[int, int] = {}  # partition → array bytes of its resync answers this round
        self._t0 = 0.0
        self.wire = TRANSPORTS[server.cfg.fed.transport]  # the dtype adapters and deltas travel in
        self._kind = MessageType.TRAIN  # what this exchange's messages ask: train, or (after the last round) evaluate

    def summary(self) -> None:
        cfg = self.server.cfg
        log.info("fedlora %s on %d nodes: %d rounds, fraction %.2f", cfg.fed.method, len(self.nodes), cfg.fed.rounds, cfg.fed.fraction)

    # ------------------------------------------------------------------ the run
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn=None,
    ) -> Result:
        """Rounds ``state.round+1 … fed.rounds`` (or ``num_rounds`` more), one log line each.

        Flower's default loop would print fedlora's server-side metrics as
        "ClientApp-side train metrics" and an empty federated evaluation; the
        global model is evaluated on the server (``Server.finish``), so the
        rows say so."""
        if timeout is not None:
            self.timeout = float(timeout)
        total = self.server.cfg.fed.rounds
        last = total if num_rounds is None else self.state.round + num_rounds
        result = Result()
        self.summary()
        while self.state.round < last:
            t = self.state.round + 1
            self.configure_train(t, ArrayRecord(), ConfigRecord(), grid)
            arrays, _metrics = self.aggregate_train(t, self._exchange(grid))
            result.arrays = arrays
            row = self.server.rounds[-1]
            result.train_metrics_clientapp[t] = MetricRecord({k: v for k, v in row.items() if _number(v) and not k.startswith("eval_")})
            evaluated = {k: v for k, v in row.items() if k.startswith("eval_") and _number(v)}
            if evaluated:
                result.evaluate_metrics_serverapp[t] = MetricRecord(evaluated)
            log.info("round %d/%d: %s", t, total, _round_line(row))
        if self.server.cfg.fed.received_eval and self.state.round >= total:
            try:
                self.evaluate_final(grid)
            except Exception as e:  # the trained model and its files matter more than this score: log and go on
                log.error("the final evaluation on the nodes failed (%s: %s); the summary has no received_final", type(e).__name__, e)
            if self.server.received_final:
                result.evaluate_metrics_clientapp[self.state.round] = MetricRecord(
                    {f"received_{k}": v for k, v in self.server.received_final.items() if _number(v)}
                )
        return result

    # ---------------------------------------------------------------- training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._grid = grid
        self._kind = MessageType.TRAIN
        self._refresh_nodes(grid)
        self._jobs = self.server.plan(self.state)
        self._bytes_down, self._bytes_up = {}, {}
        self._resent: set[int] = set()  # partitions sent their base deltas again this round (once at most)
        self._messages = [(self._message(job, self.synced.get(self.nodes[job.index], 0)), job) for job in self._jobs if job.index in self.nodes]
        self._t0 = time.perf_counter()
        return [m for m, _ in self._messages]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        by_job = self._match(replies)
        # Resync answers still here came through Flower's own loop (send_and_receive); ``start``
        # resends them as they arrive instead (``_exchange``).
        resync = {index: through for index, reply in by_job.items() if (through := _resync(reply)) is not None and index not in self._resent}
        if resync:
            by_job.update(self._resend(resync))
        train_s = time.perf_counter() - self._t0
        results = [self._result(job, by_job.get(job.index)) for job in self._jobs]
        self.state = self.server.finish(self.state, self._jobs, results, train_s)
        if self.state.base_delta:
            self.history[(self.state.round, self.state.round)] = dict(self.state.base_delta)
        self._prune()
        row = self.server.rounds[-1]
        metrics = MetricRecord({k: v for k, v in row.items() if _number(v)})
        adapters = ArrayRecord({f"{m}/{p}": t.float() for m, a in self.state.adapters.items() for p, t in (("B", a.B), ("A", a.A))})
        return adapters, metrics

    # ----------------------------------------------------------------- helpers
    def _message(self, job: ClientJob, since: int) -> Message:
        """The job's train message with every base delta after round ``since``: one snapshot
        Σ_t ΔW0_t for a node that holds none (its size does not grow with the rounds)."""
        content = encode_start(
            job.start,
            round=job.round,
            partition_id=job.index,
            rank=job.client.rank,
            seed=job.seed,
            send_label_counts=job.send_label_counts,
            wire=self.wire,
            since=since,
            noise_multiplier=dp.noise_multiplier if (dp := self.server.exp.local_dp) is not None else 0.0,
        )
        last = job.round - 1
        if (since == 0 or since < self.pruned) and last >= 2 and self.server.folded:
            if since > 0:  # a node the history no longer reaches back to (sampled rarely, or it lost what it folded)
                log.info(
                    "round %d: node %d (partition %d) is sent the snapshot of rounds 1..%d (it holds %d)",
                    job.round,
                    self.nodes[job.index],
                    job.index,
                    last,
                    since,
                )
            # A sum of bf16-rounded deltas is not itself bf16: a snapshot of several rounds travels in float32,
            # exactly. (One round is sent as that round's delta, below: the folded sum is its SVD, and in bf16
            # those factors would round to another matrix than the one the server folded.)
            encode_broadcast(content, {(1, last): dict(self.server.folded)}, torch.float32)
        else:
            encode_broadcast(content, {span: d for span, d in self.history.items() if span[1] > since}, self.wire)
        self._bytes_down[job.index] = self._bytes_down.get(job.index, 0) + _array_bytes(content)
        return Message(content=content, dst_node_id=self.nodes[job.index], message_type=self._kind)

    def _prune(self) -> None:
        """Drop the base deltas every node of the run has folded: the history would otherwise keep
        every round's (full-rank for exact methods: gigabytes a round at LLM widths). A node that
        later needs a dropped round (it lost its sum) is sent the snapshot of every round instead.

        With client sampling a node can go unsampled for many rounds, and the history would grow back
        to it; once the history's bytes exceed the snapshot's (Σ_t ΔW0_t, factored: at most min(m, n)
        columns a module, in float32), the oldest rounds go too: a node that far behind is cheaper to
        send the snapshot, so what the server holds stays within about twice the snapshot."""
        if not self.nodes:
            return
        floor = min(self.synced.get(node, 0) for node in self.nodes.values())
        if floor > self.pruned:
            self.history = {span: d for span, d in self.history.items() if span[1] > floor}
            self.pruned = floor
        if self.state.round < 2 or not self.server.folded:
            return  # one round travels as its own delta (_message), never as the snapshot
        snapshot = 4 * sum(f.numel() for f in self.server.folded.values())
        width = torch.empty((), dtype=self.wire).element_size()
        held = {span: width * sum(f.numel() for f in d.values()) for span, d in self.history.items()}
        for span in sorted(held):
            if sum(held.values()) <= snapshot:
                break
            del self.history[span], held[span]
            self.pruned = max(self.pruned, span[1])

    def _exchange(self, grid: Grid) -> list[Message]:
        """Push this round's messages and pull replies as they come, each message with
        ``timeout`` seconds to be answered. A node that answers "resync" is sent its
        base deltas at once, with a full timeout of its own."""
        ids = grid.push_messages([m for m, _ in self._messages])
        del ids  # the Grid wrote each message's id into it
        start = time.monotonic()
        pending = {m.metadata.message_id: (job, start + self.timeout) for m, job in self._messages}
        replies: list[Message] = []
        while pending:
            for reply in grid.pull_messages(list(pending)):
                job, _ = pending.pop(reply.metadata.reply_to_message_id, (None, 0.0))
                if job is None:
                    continue
                through = _resync(reply)
                if through is None or job.index in self._resent:
                    # one resend a round: a node that asks again after it (it cannot fold what it got) is
                    # dropped as such, so no node holds a round open with endless resends
                    replies.append(reply)
                    continue
                self._resent.add(job.index)
                self._bytes_up[job.index] = self._bytes_up.get(job.index, 0) + _array_bytes(reply.content)
                message = self._resync_message(job, through)
                grid.push_messages([message])
                self._messages.append((message, job))
                pending[message.metadata.message_id] = (job, time.monotonic() + self.timeout)
            now = time.monotonic()
            pending = {k: v for k, v in pending.items() if v[1] > now}
            if pending:
                time.sleep(min(self.poll_s, max(0.01, min(v[1] for v in pending.values()) - now)))
        return replies

    def _resync_message(self, job: ClientJob, through: int) -> Message:
        node = self.nodes[job.index]
        log.warning("round %d: node %d (partition %d) has folded only through round %d; sending it every base delta since", job.round, node, job.index, through)
        self.synced[node] = through
        return self._message(job, through)

    def _match(self, replies: Iterable[Message], messages: list[tuple[Message, ClientJob]] | None = None) -> dict[int, Message | None]:
        """Partition → its reply (None when none came), by the id of the message each reply answers."""
        sent = {m.metadata.message_id: job for m, job in (self._messages if messages is None else messages)}
        out: dict[int, Message | None] = {job.index: None for job in sent.values()}
        for reply in replies:
            job = sent.get(reply.metadata.reply_to_message_id)
            if job is not None:
                out[job.index] = reply
        return out

    def _resend(self, through: dict[int, int]) -> dict[int, Message | None]:
        """Nodes that lost their base deltas get all of them since the round they name, in this round."""
        self._resent.update(through)
        jobs = {job.index: job for job in self._jobs}
        messages = [(self._resync_message(jobs[index], last), jobs[index]) for index, last in through.items()]
        replies = self._grid.send_and_receive([m for m, _ in messages], timeout=self.timeout)
        return self._match(replies, messages)

    def _refresh_nodes(self, grid: Grid) -> None:
        """Online nodes this strategy has not seen say which partition they hold and take it over."""
        online = set(grid.get_node_ids())
        newcomers = online - set(self.nodes.values()) - self.strangers
        if not newcomers:
            return
        num_clients = len(self.server.exp.clients)
        claims, refused, silent = ask_partitions(
            grid, sorted(newcomers), num_clients, timeout=min(self.timeout, 60.0), node_data=self.server.cfg.data.node_data
        )
        for node, reason in refused.items():
            log.warning("node %d is not used: %s", node, reason)
            self.strangers.add(node)
        for node in silent:  # asked again before the next round
            log.warning("node %d did not say which partition it holds; asking again next round", node)
        for pid, node in sorted(claims.items()):
            old = self.nodes.get(pid)
            if old is not None and old in online:
                log.warning("partition %d: node %d (new) replaces node %d, which still looks online", pid, node, old)
            else:
                log.warning("partition %d: node %d joins%s", pid, node, "" if old is None else f" in place of node {old}")
            if old is not None:
                self.strangers.add(old)  # never asked again, never swapped back
                self.synced.pop(old, None)
            self.nodes[pid] = node
            self.synced.pop(node, None)

    def _failure(self, job: ClientJob, reply: Message | None, what: str = "update") -> ClientResult | None:
        """Why ``job`` has no answer to read (no node, no reply, an error reply, or a resync request
        still unanswered after its one resend), or None."""
        node = self.nodes.get(job.index)
        if node is None:
            return ClientResult(error=f"no node holds partition {job.index}")
        if reply is None:
            return ClientResult(error=f"no reply from node {node} within {self.timeout:g} s")
        if reply.has_error():
            return ClientResult(error=f"node {node} failed: {reply.error.reason} (code {reply.error.code})")
        try:
            resync = decode_resync(reply.content)
        except MalformedRecord as e:
            return ClientResult(error=f"node {node} sent a bad {what}: {e}")
        except Exception as e:  # anything a reply can make decoding raise: drop the client, never the run
            return ClientResult(error=f"node {node} sent a reply that cannot be read ({type(e).__name__}: {e})")
        if resync is not None:
            return ClientResult(error=f"node {node} could not fold the base deltas it was sent")
        return None

    def _result(self, job: ClientJob, reply: Message | None) -> ClientResult:
        node = self.nodes.get(job.index)
        failed = self._failure(job, reply)
        if failed is not None:
            return failed
        try:
            update, stats = decode_update(reply.content, job.client.client_id, job.start)
        except (MalformedRecord, AggregationError) as e:
            return ClientResult(error=f"node {node} sent a bad update: {e}")
        except Exception as e:  # anything else a reply can make decoding raise: drop the client, never the run
            return ClientResult(error=f"node {node} sent an update that cannot be read ({type(e).__name__}: {e})")
        try:
            self.server.exp.aggregator.validate(self.state, [update])
        except Exception as e:  # its stats stay: under local DP the steps it reports count in its ε, refused or not
            reason = (
                f"node {node} sent a bad update: {e}"
                if isinstance(e, AggregationError)
                else f"node {node} sent an update that cannot be checked ({type(e).__name__}: {e})"
            )
            return ClientResult(error=reason, stats=stats)
        self.synced[node] = job.round - 1  # it folded every base delta before this round
        up = self._bytes_up.get(job.index, 0) + _array_bytes(reply.content)
        return ClientResult(update=update, stats=stats, wire={"wire_bytes_down": self._bytes_down[job.index], "wire_bytes_up": up})

    # ------------------------------------- evaluation: on the server, in finish; on the nodes, at the end
    def evaluate_final(self, grid: Grid) -> None:
        """``fed.received_eval``: the nodes ``plan`` samples for the round after the last score the final
        model, as that round would send it them, on their held-out examples (every earlier
        round's model is scored the same way by the next round's clients, before they train). One
        exchange of evaluate messages, resyncs answered as in training."""
        self._grid = grid
        self._kind = MessageType.EVALUATE
        self._refresh_nodes(grid)
        self._jobs = self.server.plan(self.state)
        self._bytes_down, self._bytes_up, self._resent = {}, {}, set()
        self._messages = [(self._message(job, self.synced.get(self.nodes[job.index], 0)), job) for job in self._jobs if job.index in self.nodes]
        by_job = self._match(self._exchange(grid))
        self.server.finish_received(self._jobs, [self._scores(job, by_job.get(job.index)) for job in self._jobs])

    def _scores(self, job: ClientJob, reply: Message | None) -> ClientResult:
        node = self.nodes.get(job.index)
        failed = self._failure(job, reply, "scores")
        if failed is not None:
            return failed
        try:
            stats = decode_scores(reply.content)
        except MalformedRecord as e:
            return ClientResult(error=f"node {node} sent bad scores: {e}")
        self.synced[node] = job.round - 1
        return ClientResult(stats=stats)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def _resync(reply: Message | None) -> int | None:
    """The round a reply asks to be resynchronised from; None for anything else (a malformed
    resync record is left for ``_result`` to refuse, with the node's name)."""
    if reply is None or reply.has_error():
        return None
    try:
        return decode_resync(reply.content)
    except MalformedRecord:
        return None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _round_line(row: dict) -> str:
    parts = [f"{row['clients']} clients" + (f", {row['dropped']} dropped" if row.get("dropped") else ""), f"train loss {row['train_loss']:.4f}"]
    parts += [f"{k} {v:.4f}" for k, v in row.items() if k.startswith("eval_") and k != "eval_s" and _number(v)]
    parts.append(f"{row['train_s']:.1f} s")
    return " · ".join(parts)


def _array_bytes(content) -> int:
    """Serialised bytes of a message's arrays (numpy headers and keys included)."""
    return sum(rec.count_bytes() for rec in content.array_records.values())
