"""fedlora's Flower ServerApp: ``fedlora run`` with Flower moving the bytes.

The run folder (config, metrics, checkpoints, plots, summary, peft adapter)
is written by the same ``run_experiment`` as the in-process engine, at
``output_dir`` as the ServerApp's process sees it (give an absolute path).
Only the engine differs: a roll-call maps partition ids to nodes, then
:class:`FedLoraStrategy` drives the rounds.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..config import ConfigError
from ..core import ServerState
from ..engine.run import run_experiment
from ..engine.server import Server
from .run_config import config_from_run_config
from .strategy import FedLoraStrategy

__all__ = ["app", "discover_nodes", "flower_engine"]

log = logging.getLogger("fedlora")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(context.run_config)
    if cfg.fed.mode != "federated":
        raise ConfigError(f"fed.mode={cfg.fed.mode!r} trains in one process: use `fedlora run`, not Flower")
    summary = run_experiment(cfg, engine=flower_engine(grid))
    log.warning("fedlora: finished %s: %s", summary["method"], summary["final"])


def flower_engine(grid: Grid):
    """``run_experiment``'s engine: the rounds from ``state`` on, over ``grid``."""

    def drive(server: Server, state: ServerState) -> ServerState:
        cfg = server.cfg
        nodes = discover_nodes(grid, len(server.exp.clients), timeout=cfg.fed.client_timeout)
        strategy = FedLoraStrategy(server, state, nodes, folded=server.folded)
        strategy.start(grid, ArrayRecord(), num_rounds=cfg.fed.rounds - state.round, timeout=cfg.fed.client_timeout)
        return strategy.state

    return drive


def discover_nodes(grid: Grid, num_clients: int, *, timeout: float, poll_s: float = 1.0) -> dict[int, int]:
    """Partition id → node id, from each node's ``node_config["partition-id"]``.

    Waits up to ``timeout`` seconds for ``num_clients`` nodes, then asks each
    which partition it holds. Every partition 0..num_clients−1 must be held by
    exactly one node, so that client i trains on the same data as in the
    in-process engine.
    """
    deadline = time.monotonic() + timeout
    while len(node_ids := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise ConfigError(f"only {len(node_ids)} of {num_clients} nodes connected within {timeout:g} s (partition.num_clients={num_clients})")
        time.sleep(poll_s)
    queries = [Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    replies = list(grid.send_and_receive(queries, timeout=max(1.0, deadline - time.monotonic())))
    nodes: dict[int, int] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error() or "fedlora.node" not in reply.content.config_records:
            raise ConfigError(f"node {node} did not say which partition it holds")
        info = reply.content.config_records["fedlora.node"]
        if "partition-id" not in info:
            raise ConfigError(f"node {node} has no partition-id in its node config (flower-supernode --node-config \"partition-id=0 num-partitions={num_clients}\")")
        pid, total = int(info["partition-id"]), int(info.get("num-partitions", num_clients))
        if total != num_clients or not 0 <= pid < num_clients:
            raise ConfigError(f"node {node} holds partition {pid} of {total}; the run has partition.num_clients={num_clients}")
        if pid in nodes:
            raise ConfigError(f"partition {pid} is held by two nodes ({nodes[pid]} and {node})")
        nodes[pid] = node
    missing = sorted(set(range(num_clients)) - set(nodes))
    if missing:
        raise ConfigError(f"no node answered for partitions {missing}")
    return nodes
