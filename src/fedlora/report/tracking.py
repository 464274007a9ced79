"""Experiment trackers (``track.to``): each round's metrics copied to TensorBoard, Weights & Biases
or MLflow as the run goes, for the dashboards people already compare runs in.

The run folder stays the record (metrics.jsonl, summary.json); a tracker gets a copy of every
metrics row (step = the round) and, at the end, the summary. All three work offline:

============  ==========================================================================================
tensorboard   event files in ``<run>/tensorboard`` (``tensorboard --logdir <output_dir>`` shows all runs)
wandb         a W&B run named after the run folder in project ``track.project``, its files in
              ``<run>/wandb``; ``WANDB_MODE=offline`` keeps it on disk (``wandb sync`` uploads it later)
mlflow        an MLflow run in experiment ``track.project``, at ``$MLFLOW_TRACKING_URI``, else in
              ``<output_dir>/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db``)
============  ==========================================================================================

A resumed run goes on in the same W&B and MLflow runs and sends only the rounds they have not had:
``<run>/track.json`` keeps their ids and the last round each tracker got. A tracker that cannot start
stops the run before it trains (a one-line error); one that fails later is dropped with a warning,
since the run, its folder and checkpoints do not depend on it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_write_text
from ..config import ConfigError

__all__ = ["Tracker", "Trackers", "check_trackers", "open_trackers"]

log = logging.getLogger(__name__)

_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow-skinny")}


def check_trackers(names: list[str]) -> None:
    """A ConfigError naming the package to install for each tracker that cannot be imported."""
    import importlib.util

    missing = [pip for name in names for module, pip in [_PACKAGES[name]] if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"track.to={','.join(names)} needs {' and '.join(missing)}: pip install {' '.join(missing)} (or pip install 'fedlora[track]')")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row's numbers (booleans and the round itself aside) as floats."""
    return {k: float(v) for k, v in row.items() if k != "round" and isinstance(v, int | float) and not isinstance(v, bool)}


def summary_scalars(summary: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The summary's finite numbers, nested keys joined with '.' (``final.accuracy``)."""
    out: dict[str, float] = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            out.update(summary_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[prefix + k] = float(v)
    return out


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The configuration as ``section.key`` → text (MLflow parameters are strings)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict) and k != "options":
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = json.dumps(v) if isinstance(v, dict | list) else str(v)
    return out


class Tracker(ABC):
    """One destination. ``state`` is what it keeps in track.json between a run and its resume."""

    name: str

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    @abstractmethod
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    @abstractmethod
    def finish(self, summary: dict[str, float] | None) -> None:
        """Record the summary (None: the run stopped early) and close."""


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict[str, Any], first: bool):
        super().__init__()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if first:
            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def finish(self, summary: dict[str, float] | None) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, saved: dict[str, Any]):
        super().__init__()
        import wandb

        # The id ties a resumed run to the W&B run it started: the same dashboard line, not a new one.
        self.state = {"id": saved.get("id") or uuid.uuid4().hex[:12]}
        self.run = wandb.init(project=project, name=run_dir.name, id=self.state["id"], resume="allow", dir=str(run_dir), config=config, reinit="create_new")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict[str, float] | None) -> None:
        if summary is not None:
            self.run.summary.update(summary)
        self.run.finish(exit_code=0 if summary is not None else 1)


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, saved: dict[str, Any]):
        super().__init__()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # The client, not mlflow's module-level active run: several runs may share one process (fedlora compare).
        uri = os.environ.get("MLFLOW_TRACKING_URI") or saved.get("uri") or f"sqlite:///{os.path.abspath(run_dir.parent / 'mlflow.db')}"
        self.client = MlflowClient(tracking_uri=uri)
        if saved.get("run_id"):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(project)
            experiment = found.experiment_id if found is not None else self.client.create_experiment(project)
            self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
            params = [Param(k, v[:6000]) for k, v in flat_config(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.state = {"run_id": self.run_id, "uri": uri}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, summary: dict[str, float] | None) -> None:
        if summary is not None:
            self.log(int(summary.get("rounds", 0)), {f"summary.{k}": v for k, v in summary.items()})
        self.client.set_terminated(self.run_id, status="FINISHED" if summary is not None else "FAILED")


class Trackers:
    """The run's trackers: each gets every metrics row past the last round it had."""

    def __init__(self, trackers: list[Tracker], path: Path, sent: dict[str, int]):
        self.trackers, self.path, self.sent = trackers, path, sent

    def log(self, rounds: list[dict[str, Any]]) -> None:
        for t in list(self.trackers):
            new = [r for r in rounds if r["round"] > self.sent.get(t.name, 0)]
            try:
                for row in new:
                    t.log(int(row["round"]), scalars(row))
            except Exception as e:  # a dashboard failing must not stop the training it reports
                log.warning("track.to: %s failed (%s: %s); the run goes on without it", t.name, type(e).__name__, e)
                self.trackers.remove(t)
                continue
            if new:
                self.sent[t.name] = int(new[-1]["round"])
        self._save()

    def finish(self, summary: dict[str, Any] | None) -> None:
        values = None if summary is None else {**summary_scalars(summary), "rounds": float(summary.get("rounds", 0))}
        for t in self.trackers:
            try:
                t.finish(values)
            except Exception as e:
                log.warning("track.to: %s failed to close (%s: %s)", t.name, type(e).__name__, e)
        self.trackers = []

    def _save(self) -> None:
        data = {t.name: {**t.state, "round": self.sent.get(t.name, 0)} for t in self.trackers}
        old = json.loads(self.path.read_text()) if self.path.is_file() else {}
        atomic_write_text(self.path, json.dumps({**old, **data}, indent=2) + "\n")


def open_trackers(names: list[str], project: str, run_dir: Path, config: dict[str, Any]) -> Trackers:
    """Start (or, from ``<run>/track.json``, resume) each named tracker; a ConfigError if one cannot start."""
    path = run_dir / "track.json"
    try:
        saved = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        raise ConfigError(f"{path} is damaged (not JSON): delete it to start the trackers afresh") from None
    trackers: list[Tracker] = []
    try:
        for name in names:
            mine = saved.get(name, {})
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(run_dir, config, first=not mine))
            elif name == "wandb":
                trackers.append(WandbTracker(run_dir, config, project, mine))
            else:
                trackers.append(MlflowTracker(run_dir, config, project, mine))
    except Exception as e:
        Trackers(trackers, path, {}).finish(None)
        hint = " (WANDB_MODE=offline keeps it on this machine)" if name == "wandb" else ""
        raise ConfigError(f"track.to: {name} could not start: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{hint}") from None
    out = Trackers(trackers, path, {name: int(saved.get(name, {}).get("round", 0)) for name in names})
    out._save()
    return out
