"""fedlora's round payloads as Flower records, and back.

Every tensor travels in an ``ArrayRecord`` as a float32 array (numpy's own
format: nothing is pickled); bf16/fp16 models are cast on the way out. With
``fed.transport: bfloat16`` adapters, heads and deltas travel as bf16 instead
(``dtype="bfloat16"``, the raw little-endian bits: numpy has no bf16), their
values already rounded so by the sender; label counts stay float32. Keys
are ``<module>/<factor>``; a broadcast base delta also carries the rounds it
covers, ``<first>-<last>/<module>/<L|R>``.

Server → client (``MessageType.TRAIN``)::

    "fedlora.job"          ConfigRecord  round, partition-id, rank, seed, train-a, train-b, train-core, keep-local, send-label-counts,
                                         since, noise-multiplier (local DP), HetLoRA's prune-* settings
    "fedlora.scales"       ConfigRecord  s_i per module
    "fedlora.adapters"     ArrayRecord   B, A of rank r_i per module (the client's start)
    "fedlora.dense"        ArrayRecord   fully trained parameters (heads)
    "fedlora.client-delta" ArrayRecord   L, R of the client-only frozen base delta (HEXA mixed ranks)
    "fedlora.broadcast"    ArrayRecord   L, R of the base deltas this node has not folded yet

Client → server::

    "fedlora.adapters", "fedlora.dense"   the trained factors and heads
    "fedlora.cores"                       instead of the factors, Fed-SB's r×r C per module (B = B_start·C)
    "fedlora.label-counts"                examples per class (only when the method asks)
    "fedlora.metrics"      MetricRecord   num-examples, partition-id, loss, steps, examples, tokens

Server → client (``MessageType.EVALUATE``, ``fed.received_eval``, after the last round): the train
message's records for the round after the last; the node scores the model they give it, untrained::

    "fedlora.metrics"      MetricRecord  partition-id, received_<metric> …, personal_n (its held-out examples)

or, from a node that lost the base deltas it folded (it restarted), instead of training or scoring::

    "fedlora.resync"       ConfigRecord  through: the last round whose base delta it holds
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from ..core import Adapter, ClientStart, ClientUpdate, Factored
from ..core.adapter import LoraSpec, rebuilt_from_cores
from ..core.state import SelfPruning

__all__ = [
    "encode_start",
    "decode_start",
    "encode_update",
    "decode_update",
    "encode_broadcast",
    "decode_broadcast",
    "encode_resync",
    "decode_resync",
    "encode_scores",
    "decode_scores",
    "MalformedRecord",
]

JOB, SCALES, ADAPTERS, DENSE, CLIENT_DELTA, BROADCAST = (
    "fedlora.job",
    "fedlora.scales",
    "fedlora.adapters",
    "fedlora.dense",
    "fedlora.client-delta",
    "fedlora.broadcast",
)
LABEL_COUNTS, METRICS, RESYNC, CORES = "fedlora.label-counts", "fedlora.metrics", "fedlora.resync", "fedlora.cores"


class MalformedRecord(ValueError):
    """A message lacks a record or key fedlora needs, or holds the wrong type."""


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


BF16 = "bfloat16"


def _bf16_array(t: Tensor) -> Array:
    bits = t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return Array(dtype=BF16, shape=tuple(t.shape), stype="fedlora.bf16-bits", data=bits.tobytes())


def _arrays(tensors: Mapping[str, Tensor], wire: torch.dtype = torch.float32) -> ArrayRecord:
    if wire == torch.bfloat16:
        return ArrayRecord({k: _bf16_array(v) for k, v in tensors.items()})
    return ArrayRecord({k: _f32(v) for k, v in tensors.items()})


def _tensor(arr: Array) -> Tensor:
    if arr.dtype == BF16:
        if math.prod(arr.shape) == 0:  # a rank-0 factor (an exactly zero residual): frombuffer refuses empty buffers
            if len(arr.data):
                raise MalformedRecord(f"a bf16 array of shape {tuple(arr.shape)} holds {len(arr.data)} bytes")
            return torch.zeros(tuple(arr.shape))
        if len(arr.data) % 2:
            raise MalformedRecord(f"a bf16 array of shape {tuple(arr.shape)} holds {len(arr.data)} bytes, not whole numbers")
        bits = torch.frombuffer(bytearray(arr.data), dtype=torch.int16)
        if bits.numel() != math.prod(arr.shape):
            raise MalformedRecord(f"a bf16 array of shape {tuple(arr.shape)} holds {bits.numel()} numbers")
        return bits.view(torch.bfloat16).reshape(tuple(arr.shape)).to(torch.float32)
    return torch.from_numpy(arr.numpy().copy())


def _tensors(content: RecordDict, key: str) -> dict[str, Tensor]:
    if key not in content.array_records:
        raise MalformedRecord(f"message has no array record {key!r}")
    return {k: _tensor(arr) for k, arr in content.array_records[key].items()}


def _split(flat: Mapping[str, Tensor], parts: tuple[str, str], what: str) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"m/B": x, "m/A": y}`` → ``{"m": (x, y)}`` for ``parts=("B", "A")``."""
    out: dict[str, dict[str, Tensor]] = {}
    for key, t in flat.items():
        mod, _, part = key.rpartition("/")
        if part not in parts or not mod:
            raise MalformedRecord(f"{what}: unexpected key {key!r}")
        out.setdefault(mod, {})[part] = t
    for mod, d in out.items():
        if set(d) != set(parts):
            raise MalformedRecord(f"{what}: module {mod!r} lacks {sorted(set(parts) - set(d))}")
    return {mod: (d[parts[0]], d[parts[1]]) for mod, d in out.items()}


def _factored(deltas: Mapping[str, Factored], prefix: str = "") -> dict[str, Tensor]:
    out = {}
    for mod, f in deltas.items():
        out[f"{prefix}{mod}/L"], out[f"{prefix}{mod}/R"] = f.L, f.R
    return out


def _put_adapters(content: RecordDict, adapters: Mapping[str, Adapter], wire: torch.dtype) -> None:
    content[ADAPTERS] = _arrays({k: v for mod, a in adapters.items() for k, v in ((f"{mod}/B", a.B), (f"{mod}/A", a.A))}, wire)
    content[SCALES] = ConfigRecord({mod: float(a.scale) for mod, a in adapters.items()})


def _get_adapters(content: RecordDict) -> dict[str, Adapter]:
    if SCALES not in content.config_records:
        raise MalformedRecord(f"message has no config record {SCALES!r}")
    scales = content.config_records[SCALES]
    factors = _split(_tensors(content, ADAPTERS), ("B", "A"), ADAPTERS)
    if set(factors) != set(scales):
        raise MalformedRecord("adapter modules and scales differ")
    return {mod: Adapter(B, A, float(scales[mod])) for mod, (B, A) in factors.items()}


# ------------------------------------------------------------------ server → client
def encode_start(
    start: ClientStart,
    *,
    round: int,
    partition_id: int,
    rank: int,
    seed: int,
    send_label_counts: bool,
    wire: torch.dtype = torch.float32,
    since: int = 0,
    noise_multiplier: float = 0.0,
) -> RecordDict:
    content = RecordDict()
    job: dict[str, Any] = {
        "round": round,
        "partition-id": partition_id,
        "rank": rank,
        "seed": seed,
        "train-a": bool(start.train_A),
        "train-b": bool(start.train_B),
        "train-core": bool(start.train_core),
        "keep-local": ",".join(start.keep_local),
        "send-label-counts": bool(send_label_counts),
        "since": int(since),  # the server holds this node as having folded every base delta through round `since`
    }
    if noise_multiplier > 0:  # local DP-SGD: the z the server's accountant reports every client's ε at
        job["noise-multiplier"] = float(noise_multiplier)
    if start.prune is not None:  # HetLoRA's self-pruning settings
        p = start.prune
        job.update(
            {"prune-gamma": p.gamma, "prune-strength": p.strength, "prune-min-rank": p.min_rank, "lora-alpha": p.lora.alpha, "lora-rslora": p.lora.rslora}
        )
    content[JOB] = ConfigRecord(job)
    _put_adapters(content, start.adapters, wire)
    content[DENSE] = _arrays(start.dense, wire)
    content[CLIENT_DELTA] = _arrays(_factored(start.base_delta), wire)
    return content


def decode_start(content: RecordDict) -> tuple[ClientStart, dict]:
    """The client's ``ClientStart`` and its job settings (round, partition-id, rank, seed, …)."""
    if JOB not in content.config_records:
        raise MalformedRecord(f"train message has no config record {JOB!r}")
    job = dict(content.config_records[JOB])
    adapters = _get_adapters(content)
    delta = {mod: Factored(L, R) for mod, (L, R) in _split(_tensors(content, CLIENT_DELTA), ("L", "R"), CLIENT_DELTA).items()}
    start = ClientStart(
        adapters=adapters,
        base_delta=delta,
        dense=_tensors(content, DENSE),
        train_A=bool(job["train-a"]),
        train_B=bool(job.get("train-b", True)),
        train_core=bool(job.get("train-core", False)),
        keep_local=tuple(p for p in str(job.get("keep-local", "")).split(",") if p),
        prune=_pruning(job),
    )
    return start, job


def _pruning(job: dict) -> SelfPruning | None:
    if "prune-gamma" not in job:
        return None
    try:
        lora = LoraSpec(alpha=float(job["lora-alpha"]), rslora=bool(job["lora-rslora"]))
        return SelfPruning(float(job["prune-gamma"]), float(job["prune-strength"]), int(job["prune-min-rank"]), lora)
    except (KeyError, TypeError, ValueError) as e:
        raise MalformedRecord(f"train message's self-pruning settings are incomplete or not numbers: {e}") from None


def encode_broadcast(content: RecordDict, entries: Mapping[tuple[int, int], Mapping[str, Factored]], wire: torch.dtype = torch.float32) -> None:
    """Add the base deltas of rounds ``first..last`` (one entry each) to a train message."""
    flat: dict[str, Tensor] = {}
    for (first, last), deltas in entries.items():
        flat.update(_factored(deltas, f"{first}-{last}/"))
    content[BROADCAST] = _arrays(flat, wire)


def decode_broadcast(content: RecordDict) -> dict[tuple[int, int], dict[str, Factored]]:
    """``{(first, last): {module: Factored}}`` in round order."""
    out: dict[tuple[int, int], dict[str, Tensor]] = {}
    for key, t in _tensors(content, BROADCAST).items():
        span, _, rest = key.partition("/")
        try:
            first, last = (int(x) for x in span.split("-"))
        except ValueError:
            raise MalformedRecord(f"{BROADCAST}: bad round span in key {key!r}") from None
        out.setdefault((first, last), {})[rest] = t
    return {span: {mod: Factored(L, R) for mod, (L, R) in _split(flat, ("L", "R"), BROADCAST).items()} for span, flat in sorted(out.items())}


# ------------------------------------------------------------------ client → server
def encode_update(update: ClientUpdate, stats: Mapping[str, float], partition_id: int, wire: torch.dtype = torch.float32) -> RecordDict:
    content = RecordDict()
    if update.cores:  # Fed-SB: only each module's r×r C travels; the server rebuilds B = B_start·C
        content[CORES] = _arrays(update.cores, wire)
    else:
        _put_adapters(content, update.adapters, wire)
    content[DENSE] = _arrays(update.dense, wire)
    if update.label_counts is not None:
        content[LABEL_COUNTS] = _arrays({"counts": update.label_counts})
    content[METRICS] = MetricRecord({"num-examples": int(update.num_examples), "partition-id": int(partition_id), **{k: float(v) for k, v in stats.items()}})
    return content


def decode_update(content: RecordDict, client_id: str, start: ClientStart | None = None) -> tuple[ClientUpdate, dict[str, float]]:
    """The update and the client's stats. A Fed-SB reply carries cores instead of adapters: they
    are read against ``start``, the ClientStart this client was sent."""
    if METRICS not in content.metric_records:
        raise MalformedRecord(f"reply has no metric record {METRICS!r}")
    metrics = dict(content.metric_records[METRICS])
    counts = None
    if LABEL_COUNTS in content.array_records:
        record = _tensors(content, LABEL_COUNTS)
        if set(record) != {"counts"}:
            raise MalformedRecord(f"{LABEL_COUNTS} must hold one array 'counts', got {sorted(record)}")
        counts = record["counts"].double()
    n = metrics.get("num-examples")
    if not isinstance(n, int):
        raise MalformedRecord(f"num-examples must be an integer, got {n!r}")
    cores: dict[str, Tensor] = {}
    if CORES in content.array_records:
        cores = _cores(_tensors(content, CORES), start)
        adapters = rebuilt_from_cores(start.adapters, cores)  # type: ignore[union-attr]
    else:
        adapters = _get_adapters(content)
    update = ClientUpdate(client_id=client_id, num_examples=n, adapters=adapters, dense=_tensors(content, DENSE), label_counts=counts, cores=cores)
    missing = [k for k in ("loss", "steps", "examples", "tokens") if k not in metrics]
    if missing:
        raise MalformedRecord(f"{METRICS} lacks {missing}")
    stats = {k: metrics[k] for k in ("loss", "steps", "examples", "tokens")}
    if "sample_rate" in metrics:  # local DP-SGD: the rate its batches were drawn at (the server accounts its ε)
        stats["sample_rate"] = metrics["sample_rate"]
    # its own model, and the model it received, on its held-out examples
    stats.update({k: v for k, v in metrics.items() if k.startswith(("personal_", "received_"))})
    _check_stats(stats)
    return update, stats


def encode_scores(scores: Mapping[str, float], partition_id: int) -> RecordDict:
    """A node's answer to an evaluate message: its ``received_*`` scores and ``personal_n``."""
    return RecordDict({METRICS: MetricRecord({"partition-id": int(partition_id), **{k: float(v) for k, v in scores.items()}})})


def decode_scores(content: RecordDict) -> dict[str, float]:
    """``received_*`` and ``personal_n`` of an evaluate reply, checked like a train reply's
    (``personal_n`` a whole number ≥ 1 wherever there are scores); ``{}`` from a node that holds no
    held-out examples."""
    if METRICS not in content.metric_records:
        raise MalformedRecord(f"reply has no metric record {METRICS!r}")
    metrics = dict(content.metric_records[METRICS])
    scores = {k: v for k, v in metrics.items() if k.startswith("received_") or k == "personal_n"}
    if any(k.startswith("received_") for k in scores) and "personal_n" not in scores:
        raise MalformedRecord(f"{METRICS} has scores but no personal_n (the held-out examples they are on)")
    _check_stats(scores)
    return scores


def _check_stats(stats: Mapping[str, Any]) -> None:
    """What the server sums, averages and accounts ε from: counts are whole numbers ≥ 0 (steps ≥ 1;
    they travel as floats in a MetricRecord), the rest real numbers, a sampling rate in (0, 1]. A
    reply that breaks this is dropped, named."""
    for key, value in stats.items():
        whole = key in ("steps", "examples", "tokens", "personal_n")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MalformedRecord(f"{METRICS}: {key} must be a number, got {value!r}")
        if whole and not (math.isfinite(value) and value == int(value) and value >= (1 if key in ("steps", "personal_n") else 0)):
            raise MalformedRecord(f"{METRICS}: {key} must be a whole number ≥ {1 if key in ('steps', 'personal_n') else 0}, got {value!r}")
    rate = stats.get("sample_rate")
    if rate is not None and not 0 < rate <= 1:
        raise MalformedRecord(f"{METRICS}: sample_rate = {rate} must be in (0, 1]")


def _cores(cores: Mapping[str, Tensor], start: ClientStart | None) -> dict[str, Tensor]:
    """Cores checked against the start they refer to: every module, each r×r."""
    if start is None or not start.train_core:
        raise MalformedRecord(f"{CORES}: this client was not asked to train cores")
    if set(cores) != set(start.adapters):
        raise MalformedRecord(f"{CORES}: modules {sorted(cores)} differ from the adapted ones")
    for m, c in cores.items():
        r = start.adapters[m].rank
        if tuple(c.shape) != (r, r):
            raise MalformedRecord(f"{CORES}: module {m!r} has a {tuple(c.shape)} core, expected ({r}, {r})")
    return dict(cores)


def encode_resync(through: int) -> RecordDict:
    """A node's answer when the base deltas it was sent do not follow round ``through``, the last it holds."""
    return RecordDict({RESYNC: ConfigRecord({"through": int(through)})})


def decode_resync(content: RecordDict) -> int | None:
    """The round a node asks to be resynchronised from, or None for an ordinary reply."""
    if RESYNC not in content.config_records:
        return None
    through = content.config_records[RESYNC].get("through")
    if not isinstance(through, int) or through < 0:
        raise MalformedRecord(f"{RESYNC}: through must be a round ≥ 0, got {through!r}")
    return through
