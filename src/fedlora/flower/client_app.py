"""fedlora's Flower ClientApp: one node = one partition of the run's data.

Each train message is one :class:`~fedlora.engine.server.ClientJob`; the node
answers with ``run_client``, the very function the in-process engine calls.
An evaluate message (``fed.received_eval``, after the last round) carries the
same records; the node answers with ``score_received``, untrained.

Data. By default a node trains on partition ``partition-id`` of the run's
training set (as client i of the in-process engine does). A node with its own
private examples names them in its node config, ``data=<path>`` (a CSV/JSONL
file when ``data.task=file``, else a folder in the GLUE layout); it then trains
on all of them, tokenised once, and reports their count as n_i. Such a node
never reads the run's data set (its machine need not have it): it builds the
model side alone (``build_experiment(with_data=False)``). Under local DP every
node trains at the noise multiplier the server sends with each job (the z the
server's accountant reports every client's ε at); a node with its own rows
checks that z against the target ε on their number.

The frozen base. The server folds each round's ``base_delta`` ΔW0_t into its
base weights; a node must train on the same W0 + Σ_t ΔW0_t. The server sends
every node only the deltas it has not acknowledged yet; the node keeps their
sum, compressed to its numerical rank, in ``context.state`` (which Flower keeps
per node between rounds) and folds it onto a pristine copy of W0 before
training. A process serves many nodes in simulation, so the model (loaded
and tokenised once per process) never keeps one node's folds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor

from ..config import ConfigError
from ..core import ClientStart, Factored
from ..core.bandwidth import TRANSPORTS
from ..data import DataError, tokenize
from ..data.instruct import tokenize_instruct
from ..engine.client import ClientData, held_out_stats, run_client, score_received
from ..engine.dp_sgd import LocalDP
from ..engine.experiment import Experiment, build_experiment, load_node_examples, node_task, personal_split
from ..engine.seeding import derive_seed
from ..privacy import PrivacyPlan
from .records import decode_broadcast, decode_start, encode_resync, encode_scores, encode_update
from .run_config import config_from_run_config

__all__ = ["app"]

app = ClientApp()

SYNC, BASE, LOCAL = "fedlora.sync", "fedlora.base", "fedlora.local"


@dataclass
class _Local:
    exp: Experiment
    pristine: dict[str, Tensor]  # W0 of the adapted modules, before any fold
    node_data: dict[tuple[str, int], tuple[ClientData, object]] = field(default_factory=dict)  # (path, pid) → its own rows
    dp_checked: set[tuple[int, float]] = field(default_factory=set)  # (n, z) a node's own rows passed the ε check at


_CACHE: dict[str, _Local] = {}


def _local(context: Context) -> _Local:
    """The process's experiment for this run: model loaded and data tokenised once. Built
    without the run's data set while every node it serves has its own (``data=`` in its node
    config), with it (once more) when a node that trains on a partition of the run's comes."""
    key = repr(sorted(context.run_config.items()))
    cfg = _CACHE[key].exp.cfg if key in _CACHE else config_from_run_config(context.run_config)
    # data.node_data: the run has no training set to partition (a node without its own rows is refused in _client_data)
    with_data = not context.node_config.get("data") and not cfg.data.node_data
    if key not in _CACHE or (with_data and _CACHE[key].exp.train is None):
        # built before the cache lets go of the last one: a build that fails leaves the working experiment in place
        exp = build_experiment(cfg, with_data=with_data)
        _CACHE.clear()  # one run at a time per process
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


def _client_data(local: _Local, context: Context, pid: int) -> tuple[ClientData, object]:
    """(ClientData, tokenised dataset) this node trains on: its own examples or partition ``pid`` of the run's."""
    exp = local.exp
    path = context.node_config.get("data")
    if not path:
        if exp.cfg.data.node_data:
            raise ValueError("this node has no data=<path> in its node config, and the run (data.node_data=true) has no training set to give it a partition of")
        return exp.clients[pid], exp.train
    key = (str(path), pid)
    if key not in local.node_data:
        # An instruction task's categories only group the server's evaluation: a node's own may be any.
        names = None if exp.cfg.data.task == "instruct" else list(exp.task.label_names or ()) or None
        text = load_node_examples(exp.cfg, exp.task, str(path), names)
        data = (tokenize_instruct if exp.causal else tokenize)(text, exp.tokenizer, exp.cfg.model.max_length)
        counts = None if exp.task.is_regression else torch.bincount(torch.as_tensor(text.labels), minlength=exp.task.num_labels).double()
        idx, held = personal_split(np.arange(len(text)), exp.cfg.fed.personal_eval, derive_seed(exp.cfg.seed, "personal", pid))
        if held is not None and counts is not None:
            counts = torch.bincount(torch.as_tensor(text.labels[idx]), minlength=exp.task.num_labels).double()
        client = ClientData(client_id=exp.clients[pid].client_id, indices=idx, rank=exp.clients[pid].rank, label_counts=counts, held_out=held)
        local.node_data[key] = (client, data)
    return local.node_data[key]


def _local_dp(local: _Local, job: dict, n: int, own_rows: bool) -> LocalDP | None:
    """Local DP-SGD's settings: the run's clip C and the noise multiplier z the server sends with
    the job (its accountant reports every client's ε at that z). A node with its own ``n`` rows,
    which the server planned z without, is refused (one line) if δ ≥ 1/n or if, over the planned
    rounds, z would spend more than the target ε on them."""
    cfg = local.exp.cfg
    if cfg.privacy.mode != "local":
        return None
    if "noise-multiplier" not in job:
        raise ValueError("privacy.mode=local, but the job carries no noise multiplier: the server runs an older fedlora than this node")
    z = float(job["noise-multiplier"])
    p = cfg.privacy
    plan = PrivacyPlan("local", p.accountant, p.delta, z, 0.0, local=LocalDP(clip=p.clip, noise_multiplier=z, secure_noise=p.secure_noise))
    if own_rows and (n, z) not in local.dp_checked:
        plan.check_local_client(n, cfg)
        local.dp_checked.add((n, z))
    return plan.local


class _Gap(Exception):
    """The base deltas sent do not follow the last round this node folded (it restarted and lost them)."""

    def __init__(self, through: int):
        self.through = through


def _sync_base(content: RecordDict, context: Context, job: dict) -> dict[str, Factored]:
    """Σ ΔW0 through the last finished round: the node's sum plus what the message brings.
    Raises :class:`_Gap` (nothing stored) when the message skips rounds this node lacks: a span
    that does not follow what it holds, or (``since`` in the job) a server that holds it as
    having folded more rounds than it has. Having folded them, it holds every round before
    this one, those without a base delta included (as the server then holds it)."""
    through = int(context.state[SYNC]["through"]) if SYNC in context.state.config_records else 0
    flat = context.state[BASE].to_torch_state_dict() if BASE in context.state.array_records else {}
    total = {k[:-2]: Factored(flat[k], flat[k[:-2] + "/R"]) for k in flat if k.endswith("/L")}
    held, snapshot = through, False
    for (first, last), deltas in decode_broadcast(content).items():
        if last <= through:
            continue  # sent again after a reply was lost; already in the sum
        if first == 1:
            total, snapshot = dict(deltas), True  # a snapshot of every round so far (after a server resume)
        elif first == through + 1:
            for m, delta in deltas.items():  # keep the sum at its numerical rank ≤ min(m, n)
                total[m] = (delta + total[m]).compress() if m in total else delta
        else:
            raise _Gap(through)
        through = last
    if "since" in job:  # a server that says what it sent from (older ones do not)
        if held < int(job["since"]) and not snapshot:
            raise _Gap(held)
        through = max(through, int(job["round"]) - 1)
    context.state[SYNC] = ConfigRecord({"through": through})
    context.state[BASE] = ArrayRecord({f"{m}/{p}": t for m, f in total.items() for p, t in (("L", f.L), ("R", f.R))})
    return total


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The server's roll-call: which partition this node holds (and whether its own data is there)."""
    info: dict[str, int | str] = {k: int(context.node_config[k]) for k in ("partition-id", "num-partitions") if k in context.node_config}
    data = context.node_config.get("data")
    if data and not Path(str(data)).exists():
        info["error"] = f"its node config names data={data!r}, which does not exist on that machine"
    elif data:
        info["own-data"] = 1
        try:  # what the node needs of the run's task to read its rows (a file task's classes), asked before the run starts
            node_task(config_from_run_config(context.run_config))
        except (ConfigError, DataError) as e:
            info["error"] = str(e)
    return Message(content=RecordDict({"fedlora.node": ConfigRecord(info)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    job = _job(msg, context)
    if isinstance(job, Message):
        return job
    exp, own = job.exp, _own_parameters(context)  # what this node keeps between rounds (FedSA-LoRA's B and head); never sent
    update, stats = run_client(
        exp.fm,
        job.start,
        job.client,
        job.data,
        exp.cfg.train,
        int(job.config["seed"]),
        pad_token_id=exp.pad_token_id,
        send_label_counts=bool(job.config["send-label-counts"]),
        privacy=_local_dp(job.local, job.config, len(job.client.indices), own_rows=bool(context.node_config.get("data"))),
        local=own,
        task=exp.task,
        eval_batch_size=exp.cfg.train.eval_batch_size,
        transport=TRANSPORTS[exp.cfg.fed.transport],
        score_received=exp.cfg.fed.received_eval,
    )
    if own:
        context.state[LOCAL] = ArrayRecord({f"{part}/{k}": t for part, group in own.items() for k, t in group.items()})
    return Message(content=encode_update(update, stats.as_dict(), job.pid, TRANSPORTS[exp.cfg.fed.transport]), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The final round's federated evaluation (``fed.received_eval``): the model the message gives
    this node, scored untrained on its held-out examples."""
    job = _job(msg, context)
    if isinstance(job, Message):
        return job
    exp = job.exp
    scores = score_received(
        exp.fm,
        job.start,
        job.client,
        job.data,
        exp.task,
        eval_batch_size=exp.cfg.train.eval_batch_size,
        pad_token_id=exp.pad_token_id,
        local=_own_parameters(context),
    )
    return Message(content=encode_scores(held_out_stats(scores, job.client), job.pid), reply_to=msg)


@dataclass
class _Job:
    """A train or evaluate message, checked and read, with the node's base folded as the server's."""

    local: _Local
    exp: Experiment
    start: ClientStart
    config: dict
    pid: int
    client: ClientData
    data: object


def _job(msg: Message, context: Context) -> _Job | Message:
    """The message's job on this node's data, its base folded up to the round before the job's;
    or the resync answer to send instead (the node lacks base deltas the message assumes)."""
    local = _local(context)
    exp = local.exp
    start, job = decode_start(msg.content)
    pid = _partition_id(context, len(exp.clients))
    if pid != int(job["partition-id"]):
        raise ValueError(f"job for partition {job['partition-id']} reached the node holding partition {pid}")
    client, data = _client_data(local, context, pid)
    if int(job["rank"]) != client.rank:
        # a method may lower a client's rank (HetLoRA's self-pruning), never raise it
        if not 1 <= int(job["rank"]) < client.rank or start.prune is None:
            raise ValueError(f"server asks for rank {job['rank']}, the run's config gives client {pid} rank {client.rank}")
        client = replace(client, rank=int(job["rank"]))
    try:
        base = _sync_base(msg.content, context, job)
    except _Gap as gap:  # ask the server for every base delta after the last round this node holds
        return Message(content=encode_resync(gap.through), reply_to=msg)
    exp.fm.load_base_state(local.pristine)
    exp.fm.fold(base)
    return _Job(local, exp, start, job, pid, client, data)


def _own_parameters(context: Context) -> dict:
    """{"B": {module: B}, "dense": {name: tensor}} this node stored after its last round, or {}."""
    if LOCAL not in context.state.array_records:
        return {}
    out: dict[str, dict] = {}
    for key, t in context.state[LOCAL].to_torch_state_dict().items():
        part, name = key.split("/", 1)
        out.setdefault(part, {})[name] = t
    return out
