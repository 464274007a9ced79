"""Run configuration: typed dataclasses, loaded from YAML or TOML, with dotted
command-line overrides (``train.lr=5e-4 fed.method=fedex``) and validation
that names the offending key.

Paths (``data.data_dir``, ``data.train_file``, ``data.eval_file``, ``model.name`` when
it is a local folder) written in a config file are relative to the folder that holds
the file, so a config means the same from any working folder; given as command-line
overrides, or left at their defaults, they are relative to the working folder, as is
``output_dir`` always (runs land under the folder you run from). `load_config` makes
them all absolute, so the ``config.yaml`` of a run folder is valid anywhere and a
resume compares equal from any working folder."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "RunConfig", "load_config", "apply_overrides", "config_to_dict"]


class ConfigError(ValueError):
    """A config file, key or value is wrong."""


TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass
class ModelConfig:
    name: str = "minilm"  # short name, local folder or hub id
    target_modules: list[str] = field(default_factory=list)  # empty: the architecture's default (peft's table)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    client_ranks: list[int] = field(default_factory=list)  # per client, cycled; empty = all at `rank`
    max_length: int = 128
    quantization: str = "none"  # none | 4bit (NF4, QLoRA) | 8bit: bitsandbytes, CUDA only
    base_delta: str = "auto"  # where exact methods' ΔW0 lives: fold (into W0) | factored (beside it) | auto (factored iff quantized)
    pair_encoder: str = "cross"  # sentence pairs: cross (one sequence) | siamese (each sentence apart, head on their cosine: models/siamese.py)
    export_rank: int = 0  # > 0: export each module's best rank-≤N approximation (error and metrics in summary.json); 0 = exact


@dataclass
class DataConfig:
    task: str = "sst2"  # GLUE task; "file" (classification from train_file/eval_file); "instruct" (causal LM)
    source: str = "auto"  # auto (local copy if there, else the hub) | local | hub
    data_dir: str = "../shared/data/glue"  # without a config file: relative to the working folder
    train_file: str = ""
    eval_file: str = ""
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    label_column: str = "label"
    label_names: list[str] = field(default_factory=list)  # task=file: the classes by name (labels may be these names); empty: integer ids
    regression: bool = False
    max_train_examples: int = 0  # 0 = all
    max_eval_examples: int = 0
    eval_split: str = "dev"  # dev | holdout: evaluate on `holdout_examples` held out of the training set (recipe sweeps never see dev)
    holdout_examples: int = 500  # eval_split=holdout: a fixed subset (the same for every seed), never trained on
    holdout_min_words: int = 0  # holdout: hold out sentences of ≥ N words and drop their phrases from training
    as_prompt: bool = False  # a GLUE task as label-word prompts for a causal LM (data/prompts.py)
    category_field: str = ""  # instruct: the field partitions skew by (empty: none, every example in one category)
    sample_prompts: int = 3  # instruct: answers generated for the first N eval prompts after every evaluation
    sample_tokens: int = 48  # instruct: new tokens per generated answer (greedy)
    # Flower only: every node trains on its own rows (data=<path> in its node config) and the server reads no
    # training set, only the evaluation set (the task's dev set, or eval_file)
    node_data: bool = False


@dataclass
class PartitionConfig:
    scheme: str = "iid"  # iid | dirichlet | dirichlet_class | pathological | quantity
    num_clients: int = 10
    alpha: float = 0.5  # Dirichlet concentration (dirichlet, quantity)
    labels_per_client: int = 1  # pathological


@dataclass
class TrainConfig:
    # 1e-3: the best adapter rate of the centralized sweeps on SST-2, STS-B and RTE (BENCHMARKS.md
    # "Task recipes"). The head's rate, when 0, follows the head (engine/train.py::head_lr).
    lr: float = 1e-3
    head_lr: float = 0.0  # the head's learning rate; 0: train.lr for a classification head, 10× for a regression head
    weight_decay: float = 0.01
    optimizer: str = "adamw"  # adamw | sgd (FedAvg's and DP-FedAvg's local SGD; `momentum` applies to it)
    momentum: float = 0.0  # sgd only: heavy-ball momentum, reset every round like the optimiser itself
    epochs: float = 1.0  # local epochs per round (ignored when steps > 0)
    steps: int = 0  # local optimiser steps per round
    batch_size: int = 32
    grad_accum: int = 1
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    eval_batch_size: int = 128
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (auto: CUDA if present, else MPS, else CPU)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16: autocast; weights and aggregation stay fp32
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time


@dataclass
class FedConfig:
    mode: str = "federated"  # federated | centralized
    method: str = "hexa"
    options: dict[str, Any] = field(default_factory=dict)  # method keyword options
    weighting: str = "data_size"
    rounds: int = 10
    fraction: float = 1.0  # clients sampled per round
    eval_every: int = 1
    eval_clients: bool = False  # also evaluate the global model on each client's data
    personal_eval: float = 0.0  # hold out this fraction of each client's examples; each client reports its own model's metrics on them
    received_eval: bool = False  # federated evaluation: each client also scores the model it receives, before training, on those examples
    client_timeout: float = 300.0  # Flower: seconds a round (and the roll-call) waits for replies; later ones are dropped
    residual_tol: float = 0.0  # exact methods: send the base delta at the smallest rank within this relative error (0: exact)
    transport: str = "float32"  # float32 | bfloat16: the dtype adapters, heads and deltas travel in (bf16: half the bytes, rounded)
    max_update_norm: float = 0.0  # drop a client whose effective update ‖s·B_i·A_i − s·B·A‖ (+ heads) exceeds this (0: no bound)
    max_update_ratio: float = 0.0  # drop a client whose update norm exceeds this many times the round's median (0: no bound)


@dataclass
class PrivacyConfig:
    """Differential privacy (docs/privacy.md)."""

    mode: str = "none"  # none | client (DP-FedAvg: clip each client's whole update, noise the sum) | local (DP-SGD on each client)
    clip: float = 1.0  # C: client mode, the L2 bound of a client's update; local mode, of a per-example gradient
    noise_multiplier: float = 0.0  # z: the noise's standard deviation is z·C (0 with target_epsilon > 0: from the accountant)
    target_epsilon: float = 0.0  # > 0: choose z so that the planned rounds spend this ε (to 0.01, never above)
    delta: float = 1e-5
    accountant: str = "rdp"  # rdp | prv (Opacus' accountants)
    secure_noise: bool = False  # seed the noise from the OS's entropy (not reproducible) instead of the run's seed


@dataclass
class TrackConfig:
    """Experiment trackers fed each round's metrics (report/tracking.py); they change no result."""

    to: list[str] = field(default_factory=list)  # tensorboard | wandb | mlflow (empty: the run folder only)
    project: str = "fedlora"  # the W&B project / MLflow experiment the run goes into


@dataclass
class RunConfig:
    name: str = ""
    output_dir: str = "runs"
    seed: int = 0
    threads: int = 0  # torch threads, 0 = torch's default
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def validate(self) -> RunConfig:
        for key, value in _float_settings(self):  # inf or NaN passes every comparison below that it should fail
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value}")
        checks = [
            (
                self.name == "" or (self.name not in (".", "..") and not any(c in self.name for c in "/\\\0")),
                f"name must be one folder name inside output_dir (no '/', not '.' or '..'), got {self.name!r}",
            ),
            (self.seed >= 0, f"seed must be ≥ 0, got {self.seed}"),
            (self.train.eval_batch_size >= 1, f"train.eval_batch_size must be ≥ 1, got {self.train.eval_batch_size}"),
            (self.train.weight_decay >= 0, f"train.weight_decay must be ≥ 0, got {self.train.weight_decay}"),
            (self.model.rank >= 1, "model.rank must be ≥ 1"),
            (self.model.export_rank >= 0, "model.export_rank must be ≥ 0 (0: the exact export)"),
            (self.model.alpha > 0, "model.alpha must be > 0"),
            (0 <= self.model.dropout < 1, "model.dropout must be in [0, 1)"),
            (all(r >= 1 for r in self.model.client_ranks), "model.client_ranks must all be ≥ 1"),
            (self.model.max_length >= 8, "model.max_length must be ≥ 8"),
            (self.model.quantization in ("none", "4bit", "8bit"), f"model.quantization must be none, 4bit or 8bit, got {self.model.quantization!r}"),
            (self.model.pair_encoder in ("cross", "siamese"), f"model.pair_encoder must be cross or siamese, got {self.model.pair_encoder!r}"),
            (self.model.base_delta in ("auto", "fold", "factored"), f"model.base_delta must be auto, fold or factored, got {self.model.base_delta!r}"),
            (
                not (self.model.quantization != "none" and self.model.base_delta == "fold"),
                "model.base_delta=fold cannot add base deltas exactly to a quantized W0: use factored or auto",
            ),
            (self.data.source in ("auto", "local", "hub"), f"data.source must be 'auto', 'local' or 'hub', got {self.data.source!r}"),
            (self.partition.num_clients >= 1, "partition.num_clients must be ≥ 1"),
            (
                self.partition.scheme in ("iid", "dirichlet", "dirichlet_class", "pathological", "quantity"),
                f"partition.scheme must be iid, dirichlet, dirichlet_class, pathological or quantity, got {self.partition.scheme!r}",
            ),
            (self.partition.alpha > 0, f"partition.alpha must be > 0, got {self.partition.alpha}"),
            (self.partition.labels_per_client >= 1, "partition.labels_per_client must be ≥ 1"),
            (self.train.lr > 0, "train.lr must be > 0"),
            (self.train.head_lr >= 0, "train.head_lr must be ≥ 0 (0: the same as train.lr)"),
            (self.data.eval_split in ("dev", "holdout"), f"data.eval_split must be 'dev' or 'holdout', got {self.data.eval_split!r}"),
            (self.data.holdout_examples >= 1, "data.holdout_examples must be ≥ 1"),
            (self.data.holdout_min_words >= 0, "data.holdout_min_words must be ≥ 0"),
            (
                not (self.data.node_data and self.data.task == "file" and not self.data.regression and not self.data.label_names),
                "data.node_data=true with data.task=file needs data.label_names: the server reads no training file to find the classes in",
            ),
            (
                not (self.data.node_data and self.data.eval_split == "holdout"),
                "data.node_data=true: the server reads no training set to hold examples out of; use data.eval_split=dev",
            ),
            (
                not (self.data.node_data and self.fed.eval_clients),
                "data.node_data=true: fed.eval_clients scores the global model on each client's training rows, which the server does not have",
            ),
            (
                not (self.data.node_data and self.fed.mode == "centralized"),
                "data.node_data=true: the training rows are the Flower nodes' own; fed.mode=centralized has none",
            ),
            (self.train.epochs > 0 or self.train.steps > 0, "train.epochs or train.steps must be > 0"),
            (self.train.batch_size >= 1 and self.train.grad_accum >= 1, "train.batch_size and train.grad_accum must be ≥ 1"),
            (0 <= self.train.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)"),
            (self.train.optimizer in ("adamw", "sgd"), f"train.optimizer must be adamw or sgd, got {self.train.optimizer!r}"),
            (0 <= self.train.momentum < 1, f"train.momentum must be in [0, 1), got {self.train.momentum}"),
            (
                self.train.momentum == 0 or self.train.optimizer == "sgd",
                f"train.momentum={self.train.momentum} applies to train.optimizer=sgd only (AdamW keeps its own moments)",
            ),
            (self.fed.mode in ("federated", "centralized"), f"fed.mode must be 'federated' or 'centralized', got {self.fed.mode!r}"),
            (self.fed.rounds >= 1, "fed.rounds must be ≥ 1"),
            (0 < self.fed.fraction <= 1, f"fed.fraction must be in (0, 1], got {self.fed.fraction}"),
            (self.fed.eval_every >= 1, "fed.eval_every must be ≥ 1"),
            (0 <= self.fed.personal_eval < 1, f"fed.personal_eval must be in [0, 1) (0: off), got {self.fed.personal_eval}"),
            (
                not self.fed.received_eval or self.fed.personal_eval > 0,
                "fed.received_eval=true scores the global model on each client's held-out examples: set fed.personal_eval > 0 (the fraction to hold out)",
            ),
            (
                not (self.fed.received_eval and self.fed.method == "fedsa" and self.fed.mode == "federated"),
                "fed.received_eval=true: fedsa has no global model (each client keeps its own B and head); its clients' own models are fed.personal_eval's",
            ),
            (0 <= self.fed.residual_tol < 1, f"fed.residual_tol must be in [0, 1) (0: exact), got {self.fed.residual_tol}"),
            (self.fed.transport in ("float32", "bfloat16"), f"fed.transport must be float32 or bfloat16, got {self.fed.transport!r}"),
            (self.fed.max_update_norm >= 0, f"fed.max_update_norm must be ≥ 0 (0: no bound), got {self.fed.max_update_norm}"),
            (
                self.fed.max_update_ratio == 0 or self.fed.max_update_ratio > 1,
                f"fed.max_update_ratio must be > 1 (or 0: no bound), got {self.fed.max_update_ratio}",
            ),
            (self.fed.client_timeout > 0, f"fed.client_timeout must be > 0 seconds, got {self.fed.client_timeout}"),
            (self.privacy.mode in ("none", "client", "local"), f"privacy.mode must be none, client or local, got {self.privacy.mode!r}"),
            (self.privacy.clip > 0, f"privacy.clip must be > 0, got {self.privacy.clip}"),
            (self.privacy.noise_multiplier >= 0, f"privacy.noise_multiplier must be ≥ 0, got {self.privacy.noise_multiplier}"),
            (self.privacy.target_epsilon >= 0, f"privacy.target_epsilon must be ≥ 0, got {self.privacy.target_epsilon}"),
            (0 < self.privacy.delta < 1, f"privacy.delta must be in (0, 1), got {self.privacy.delta}"),
            (self.privacy.accountant in ("rdp", "prv"), f"privacy.accountant must be rdp or prv, got {self.privacy.accountant!r}"),
            (
                all(t in TRACKERS for t in self.track.to),
                f"track.to names {', '.join(repr(t) for t in self.track.to if t not in TRACKERS)}: the trackers are {', '.join(TRACKERS)}",
            ),
            (len(set(self.track.to)) == len(self.track.to), f"track.to names a tracker twice: {self.track.to}"),
            (self.track.project.strip() != "", "track.project must not be empty"),
            (
                "wandb" not in self.track.to or not any(c in self.track.project for c in "/\\#?%:"),
                f"track.project={self.track.project!r}: a W&B project name cannot hold / \\ # ? % or :",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        too_big = [r for r in self.model.client_ranks if r > self.model.rank]
        if too_big:
            raise ConfigError(f"model.client_ranks {too_big} exceed the global rank model.rank={self.model.rank}")
        return self


def _float_settings(cfg: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every float setting (fed.options, free-form, aside)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_settings(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            yield f"{prefix}{f.name}", value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp`` (str, int, float, bool, list[...], dict)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table/mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value] if not isinstance(value, str) else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.lstrip("-").isdigit()):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def _parse_value(text: str) -> Any:
    """A command-line value: YAML scalars/lists (``1e-3``, ``true``, ``[4,8]``, ``{a: 1}``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``section.key=value`` strings merged into a nested config dict."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(text)
    return data


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {str(path)!r} must end in .yaml, .yml, .toml or .json")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def config_from_dict(data: dict) -> RunConfig:
    """A nested mapping (defaults fill missing keys), type-checked and validated.
    Paths stay as given (Flower's apps resolve them in their own working folders)."""
    return _build(RunConfig, data).validate()


_PATHS = (("data", "data_dir"), ("data", "train_file"), ("data", "eval_file"), ("model", "name"))


def _absolute(value: str, base: Path, model: bool = False) -> str:
    """``value`` made absolute against ``base``; ``""`` stays empty. A model name is a
    path only when it starts with ``.``, ``/`` or ``~`` or names an existing folder with
    a ``/`` in it: short names and hub ids (``minilm``, ``FacebookAI/roberta-base``) stay."""
    if not value:
        return value
    path = os.path.expanduser(value)
    if os.path.isabs(path):
        return os.path.normpath(path)
    joined = os.path.join(base, path)
    if model and not value.startswith(".") and not ("/" in value and os.path.isdir(joined)):
        return value  # a short name or a hub id
    return os.path.abspath(joined)


def _resolve_file_paths(data: dict, base: Path) -> dict:
    """The path keys written in a config file, made absolute against the file's folder."""
    for section, key in _PATHS:
        node = data.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = _absolute(node[key], base, model=section == "model")
    return data


def _resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    """Every path still relative (overrides, defaults, ``output_dir``), against ``base``."""
    for section, key in _PATHS:
        node = getattr(cfg, section)
        setattr(node, key, _absolute(getattr(node, key), base, model=section == "model"))
    cfg.output_dir = _absolute(cfg.output_dir, base)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults ← file ← overrides, type-checked and validated, every path absolute:
    the file's own against its folder, the others against the working folder."""
    data = _resolve_file_paths(read_config_file(path), Path(os.path.abspath(path)).parent) if path else {}
    data = apply_overrides(data, list(overrides))
    return _resolve_paths(_build(RunConfig, data).validate(), Path.cwd())
