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
``<run>/track.json`` keeps their ids, the last round each tracker got and whether it was finished (a
finished run started again, which trains nothing, leaves its trackers alone). Two exceptions resend
every round: an offline W&B run (W&B cannot resume offline: each start writes a new offline-run
folder, and syncing a later folder replaces the earlier one, so the newest must hold everything) and
an MLflow run no longer in the store (``runs/`` moved, another ``MLFLOW_TRACKING_URI``: a new run).
A tracker that cannot start stops the run before it trains (a one-line error; what had started is
recorded, so the next start continues it); one that fails later is closed and dropped with a
warning, since the run, its folder and checkpoints do not depend on it. Parallel ``fedlora compare``
workers share ``<output_dir>/mlflow.db``: their starts (which create the tables and the experiment)
take turns through a lock file beside it, and a write that finds the database locked is retried.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
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
        self.resend = False  # True: this destination needs every round again (a fresh run behind a saved id)

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
        if summary is not None:
            self.log(int(summary.get("rounds", 0)), {f"summary/{k}": v for k, v in summary.items()})
        self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, saved: dict[str, Any]):
        super().__init__()
        import wandb

        # The id ties a resumed run to the W&B run it started: the same dashboard line, not a new one.
        self.state = {"id": saved.get("id") or uuid.uuid4().hex[:12]}
        # silent, console off: fedlora's own output (progress, one-line errors) stays as it is
        self.run = wandb.init(
            project=project,
            name=run_dir.name,
            id=self.state["id"],
            resume="allow",
            dir=str(run_dir),
            config=config,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.resend = bool(self.run.offline)

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
        from mlflow.tracking import MlflowClient

        # The client, not mlflow's module-level active run: several runs may share one process (fedlora compare).
        # The default store is recomputed, not saved: a runs/ folder moved elsewhere finds its mlflow.db there.
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(run_dir.parent / 'mlflow.db')}"
        with _quiet("mlflow", "alembic"), _sqlite_lock(uri):
            self.client = _retry(lambda: MlflowClient(tracking_uri=uri))
            run_id = saved.get("run_id")
            if run_id is not None and not _retry(lambda: self._exists(run_id)):
                log.warning("track.to: MLflow run %s is not in %s; a new MLflow run gets every round", run_id, uri)
                run_id = None
            if run_id is not None:
                _retry(lambda: self.client.update_run(run_id, status="RUNNING"))
            else:
                run_id = self._create(project, run_dir.name, config)
                self.resend = bool(saved)
        self.run_id: str = run_id
        self.state = {"run_id": run_id}

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise  # a locked database is not a missing run: _retry tries again

    def _create(self, project: str, name: str, config: dict[str, Any]) -> str:
        """A new run in experiment ``project``, the configuration as its parameters; each step retried
        on its own (a retried whole would leave the runs of failed attempts behind)."""
        from mlflow.entities import Param

        def experiment() -> str:
            found = self.client.get_experiment_by_name(project)
            return found.experiment_id if found is not None else self.client.create_experiment(project)

        run_id = _retry(lambda: self.client.create_run(_retry(experiment), run_name=name).info.run_id)
        params = [Param(k, v[:6000]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
            _retry(lambda i=i: self.client.log_batch(run_id, params=params[i : i + 100]))
        return run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        _retry(lambda: self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()]))

    def finish(self, summary: dict[str, float] | None) -> None:
        if summary is not None:
            self.log(int(summary.get("rounds", 0)), {f"summary.{k}": v for k, v in summary.items()})
        _retry(lambda: self.client.set_terminated(self.run_id, status="FINISHED" if summary is not None else "FAILED"))


@contextmanager
def _sqlite_lock(uri: str):
    """One process at a time sets up an SQLite store: MLflow creates and migrates its tables on first
    use, and two processes doing that at once leave a half-migrated file that no retry repairs
    (``table _alembic_tmp_params already exists``). A lock file beside the database serialises the
    starts of ``fedlora compare``'s workers; other stores (a tracking server) need none."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    with open(uri.removeprefix("sqlite:///") + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _retry(call, tries: int = 6):
    """``call()``, tried again after a short random pause when it fails: parallel workers starting
    on one new MLflow store race to create its tables and experiment, and SQLite may be locked."""
    import random

    for attempt in range(tries):
        try:
            return call()
        except Exception:
            if attempt == tries - 1:
                raise
            time.sleep(0.2 * 2**attempt * (0.5 + random.random()))


@contextmanager
def _quiet(*loggers: str):
    """Silence INFO chatter (MLflow creating its tables) while a tracker starts."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


class Trackers:
    """The run's trackers: each gets every metrics row past the last round it had."""

    def __init__(self, trackers: list[Tracker], path: Path, sent: dict[str, int]):
        self.trackers, self.path, self.sent = trackers, path, sent
        self.finished: set[str] = set()

    def log(self, rounds: list[dict[str, Any]]) -> None:
        for t in list(self.trackers):
            new = [r for r in rounds if r["round"] > self.sent.get(t.name, 0)]
            try:
                for row in new:
                    t.log(int(row["round"]), scalars(row))
            except Exception as e:  # a dashboard failing must not stop the training it reports
                log.warning("track.to: %s failed (%s: %s); the run goes on without it", t.name, type(e).__name__, e)
                self.trackers.remove(t)
                _close(t, None)
                continue
            if new:
                self.sent[t.name] = int(new[-1]["round"])
        self._save()

    def finish(self, summary: dict[str, Any] | None) -> None:
        values = None if summary is None else {**summary_scalars(summary), "rounds": float(summary.get("rounds", 0))}
        for t in self.trackers:
            if _close(t, values) and summary is not None:
                self.finished.add(t.name)
        self._save()
        self.trackers = []

    def _save(self) -> None:
        if not self.trackers:  # nothing to record (no track.to, or every tracker dropped: their entries stay as last saved)
            return
        data = {t.name: {**t.state, "round": self.sent.get(t.name, 0), "finished": t.name in self.finished} for t in self.trackers}
        old = json.loads(self.path.read_text()) if self.path.is_file() else {}
        atomic_write_text(self.path, json.dumps({**old, **data}, indent=2) + "\n")


def _close(t: Tracker, summary: dict[str, float] | None) -> bool:
    try:
        t.finish(summary)
        return True
    except Exception as e:
        log.warning("track.to: %s failed to close (%s: %s)", t.name, type(e).__name__, e)
        return False


def open_trackers(names: list[str], project: str, run_dir: Path, config: dict[str, Any]) -> Trackers:
    """Start (or, from ``<run>/track.json``, resume) each named tracker; a ConfigError if one cannot
    start. A tracker that finished this run before is left alone: it has every round and the summary."""
    path = run_dir / "track.json"
    try:
        saved = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        raise ConfigError(f"{path} is damaged (not JSON): delete it to start the trackers afresh") from None
    out = Trackers([], path, {})
    name = ""
    try:
        for name in names:
            mine = saved.get(name, {})
            if mine.get("finished"):
                continue
            if name == "tensorboard":
                t: Tracker = TensorBoardTracker(run_dir, config, first=not mine)
            elif name == "wandb":
                t = WandbTracker(run_dir, config, project, mine)
            else:
                t = MlflowTracker(run_dir, config, project, mine)
            out.trackers.append(t)
            out.sent[name] = 0 if t.resend else int(mine.get("round", 0))
    except BaseException as e:
        out._save()  # what started is recorded: the next start continues those runs instead of opening new ones
        out.finish(None)
        if not isinstance(e, Exception):
            raise
        hint = " (WANDB_MODE=offline keeps it on this machine)" if name == "wandb" else ""
        raise ConfigError(f"track.to: {name} could not start: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{hint}") from None
    out._save()
    return out
