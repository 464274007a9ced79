"""Which node holds which partition: the server asks, each node answers from
its node config (``partition-id``, ``num-partitions``).

At the start of a run every partition 0..K−1 must be held by exactly one node,
so that client i trains on the same data as in the in-process engine. Later,
the strategy asks only nodes it has not seen (a SuperNode that restarted), and
they take over the partition they name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..config import ConfigError

__all__ = ["ask_partitions", "discover_nodes"]

log = logging.getLogger("fedlora")

NODE_INFO = "fedlora.node"


def ask_partitions(
    grid: Grid, node_ids: Iterable[int], num_clients: int, *, timeout: float, node_data: bool = False
) -> tuple[dict[int, int], dict[int, str], dict[int, str]]:
    """Ask ``node_ids`` which partition they hold.

    Returns ``(claims, refused, silent)``: partition → node for the nodes that hold
    one of this run's ``num_clients`` partitions (the first claim wins); node → why
    for the nodes that cannot take part (no partition-id, another partition count,
    a partition already claimed, a ``data`` path the node does not have, or with
    ``node_data`` (``data.node_data``: the server has no training set) no ``data`` at all); and
    node → why for the nodes that did not answer in time (they may later).
    """
    queries = {n: Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids}
    replies = list(grid.send_and_receive(list(queries.values()), timeout=max(1.0, timeout)))
    node_of = {m.metadata.message_id: n for n, m in queries.items()}
    answers = {node_of[r.metadata.reply_to_message_id]: r for r in replies if r.metadata.reply_to_message_id in node_of}
    claims: dict[int, int] = {}
    refused: dict[int, str] = {}
    silent: dict[int, str] = {}
    for node in queries:
        reply = answers.get(node)
        if reply is None:
            silent[node] = f"node {node} did not answer the roll-call within {max(1.0, timeout):g} s"
            continue
        if reply.has_error() or NODE_INFO not in reply.content.config_records:
            reason = reply.error.reason if reply.has_error() else "no fedlora.node record"
            refused[node] = f"node {node} did not say which partition it holds ({reason})"
            continue
        info = reply.content.config_records[NODE_INFO]
        if "error" in info:
            refused[node] = f"node {node}: {info['error']}"
            continue
        if "partition-id" not in info:
            refused[node] = f'node {node} has no partition-id in its node config (flower-supernode --node-config "partition-id=0 num-partitions={num_clients}")'
            continue
        pid, total = int(info["partition-id"]), int(info.get("num-partitions", num_clients))
        if node_data and not info.get("own-data"):
            refused[node] = f"node {node} has no data=<path> in its node config; the run's data.node_data=true means every node trains on its own rows"
        elif total != num_clients or not 0 <= pid < num_clients:
            refused[node] = f"node {node} holds partition {pid} of {total}; the run has partition.num_clients={num_clients}"
        elif pid in claims:
            refused[node] = f"partition {pid} is held by two nodes ({claims[pid]} and {node})"
        else:
            claims[pid] = node
    return claims, refused, silent


def discover_nodes(grid: Grid, num_clients: int, *, timeout: float, poll_s: float = 1.0, report_s: float = 10.0, node_data: bool = False) -> dict[int, int]:
    """Partition id → node id for all ``num_clients`` partitions.

    Waits up to ``timeout`` seconds for ``num_clients`` nodes (saying every
    ``report_s`` seconds how many have connected), then asks each which
    partition it holds. Raises :class:`ConfigError`, before anything is
    written, when nodes are missing or disagree with the run's partitions.
    """
    start = time.monotonic()
    deadline, next_report = start + timeout, start + report_s
    while len(node_ids := list(grid.get_node_ids())) < num_clients:
        now = time.monotonic()
        if now > deadline:
            raise ConfigError(
                f"only {len(node_ids)} of {num_clients} nodes connected within {timeout:g} s: start one SuperNode per "
                f'partition (simulation: flwr run … --federation-config "num-supernodes={num_clients}")'
            )
        if now > next_report:
            log.warning("waiting for nodes: %d of %d connected (partition.num_clients=%d)", len(node_ids), num_clients, num_clients)
            next_report = now + report_s
        time.sleep(poll_s)
    # Nodes that connected just now may still be starting their ClientApp: at least 30 s to answer.
    answer_s = max(deadline - time.monotonic(), min(timeout, 30.0))
    claims, refused, silent = ask_partitions(grid, node_ids, num_clients, timeout=answer_s, node_data=node_data)
    missing = sorted(set(range(num_clients)) - set(claims))
    if missing:
        raise ConfigError(min({**silent, **refused}.values()) if refused or silent else f"no node answered for partitions {missing}")
    # Every partition has its node: a node that did not answer (a stale id of a restarted SuperNode)
    # or that cannot serve is left out, not a reason to abort the run.
    for reason in {**silent, **refused}.values():
        log.warning("%s; every partition has a node, so the run goes on without it", reason)
    return claims
