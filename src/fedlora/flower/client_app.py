"""fedlora's Flower ClientApp: one node = one partition of the run's data.

Each train message is one :class:`~fedlora.engine.server.ClientJob`; the node
answers with ``run_client``, the very function the in-process engine calls.

The frozen base. The server folds each round's ``base_delta`` ΔW0_t into its
base weights; a node must train on the same W0 + Σ_t ΔW0_t. The server sends
every node only the deltas it has not acknowledged yet; the node keeps their
sum, compressed to its numerical rank, in ``context.state`` (which Flower keeps
per node between rounds) and folds it onto a pristine copy of W0 before
training. A process serves many nodes in simulation, so the model (loaded
and tokenised once per process) never keeps one node's folds.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor

from ..core import Factored
from ..engine.client import run_client
from ..engine.experiment import Experiment, build_experiment
from .records import decode_broadcast, decode_start, encode_update
from .run_config import config_from_run_config

__all__ = ["app"]

app = ClientApp()

SYNC, BASE = "fedlora.sync", "fedlora.base"


@dataclass
class _Local:
    exp: Experiment
    pristine: dict[str, Tensor]  # W0 of the adapted modules, before any fold


_CACHE: dict[str, _Local] = {}


def _local(context: Context) -> _Local:
    """The process's experiment for this run: model loaded and data tokenised once."""
    key = repr(sorted(context.run_config.items()))
    if key not in _CACHE:
        _CACHE.clear()  # one run at a time per process
        exp = build_experiment(config_from_run_config(context.run_config))
        _CACHE[key] = _Local(exp, exp.fm.base_state())
    return _CACHE[key]


def _partition_id(context: Context, num_clients: int) -> int:
    try:
        pid = int(context.node_config["partition-id"])
    except (KeyError, ValueError, TypeError):
        raise ValueError("node_config lacks an integer 'partition-id' (flower-supernode --node-config \"partition-id=0 num-partitions=N\")") from None
    if not 0 <= pid < num_clients:
        raise ValueError(f"partition-id {pid} is outside the run's {num_clients} clients (partition.num_clients)")
    return pid


def _sync_base(content: RecordDict, context: Context) -> dict[str, Factored]:
    """Σ ΔW0 through the last finished round: the node's sum plus what the message brings."""
    through = int(context.state[SYNC]["through"]) if SYNC in context.state.config_records else 0
    flat = context.state[BASE].to_torch_state_dict() if BASE in context.state.array_records else {}
    total = {k[:-2]: Factored(flat[k], flat[k[:-2] + "/R"]) for k in flat if k.endswith("/L")}
    for (first, last), deltas in decode_broadcast(content).items():
        if last <= through:
            continue  # sent again after a reply was lost; already in the sum
        if first == 1:
            total = dict(deltas)  # a snapshot of every round so far (after a server resume)
        elif first == through + 1:
            for m, delta in deltas.items():  # keep the sum at its numerical rank ≤ min(m, n)
                total[m] = (delta + total[m]).compress() if m in total else delta
        else:
            raise ValueError(f"base deltas of rounds {first}-{last} do not follow round {through}, the last this node folded")
        through = last
    context.state[SYNC] = ConfigRecord({"through": through})
    context.state[BASE] = ArrayRecord({f"{m}/{p}": t for m, f in total.items() for p, t in (("L", f.L), ("R", f.R))})
    return total


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The server's roll-call: which partition this node holds."""
    cfg = ConfigRecord({k: int(context.node_config[k]) for k in ("partition-id", "num-partitions") if k in context.node_config})
    return Message(content=RecordDict({"fedlora.node": cfg}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    local = _local(context)
    exp = local.exp
    start, job = decode_start(msg.content)
    pid = _partition_id(context, len(exp.clients))
    if pid != int(job["partition-id"]):
        raise ValueError(f"job for partition {job['partition-id']} reached the node holding partition {pid}")
    client = exp.clients[pid]
    if client.rank != int(job["rank"]):
        raise ValueError(f"server asks for rank {job['rank']}, the run's config gives client {pid} rank {client.rank}")
    base = _sync_base(msg.content, context)
    exp.fm.load_base_state(local.pristine)
    exp.fm.fold(base)
    update, stats = run_client(exp.fm, start, client, exp.train, exp.cfg.train, int(job["seed"]),
                               pad_token_id=exp.pad_token_id, send_label_counts=bool(job["send-label-counts"]))
    return Message(content=encode_update(update, stats.as_dict(), pid), reply_to=msg)
