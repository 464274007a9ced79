"""``fedlora run``: build and check everything, then create the run folder,
simulate the rounds (resuming from a checkpoint if one is there) and write
metrics, plots, the summary and the final peft adapter."""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, config_to_dict
from ..core import ServerState
from ..models.export import export_peft_adapter, quiet_peft
from ..report.plots import plot_against_epsilon, plot_histogram, plot_metric
from ..report.tracking import Trackers, check_trackers, open_trackers
from ..report.writer import RunWriter
from .experiment import Experiment, build_experiment
from .simulator import Simulator

__all__ = ["run_name", "run_experiment", "summarise", "last_half"]


def run_name(cfg: RunConfig) -> str:
    if cfg.name:
        return cfg.name
    if cfg.fed.mode == "centralized":
        return f"{cfg.data.task}-centralized-s{cfg.seed}"
    part = cfg.partition.scheme + (f"{cfg.partition.alpha:g}" if cfg.partition.scheme in ("dirichlet", "dirichlet_class", "quantity") else "")
    method = re.sub(r"[^A-Za-z0-9._=-]+", "_", cfg.fed.method.rsplit("/", 1)[-1])  # a plug-in's path:Class, as one folder name
    return f"{cfg.data.task}-{method}-{part}-s{cfg.seed}"


def eval_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row's eval_* values, without the prefix (eval_s, the evaluation's time, left out)."""
    return {k[5:]: v for k, v in row.items() if k.startswith("eval_") and k != "eval_s"}


def last_half(evaluated: list[dict[str, Any]]) -> dict[str, float]:
    """Every eval metric averaged over the last ⌈n/2⌉ of the n evaluated rounds.

    Under label skew a federated model swings by ten points from one round to the next, so the
    final round alone measures a method plus that round's luck, and the best round is a maximum
    over noisy values chosen on the evaluation set itself. The mean over the second half of the
    run keeps the method's late level and averages the swing away: the grids' comparisons use it
    beside the final and best rounds. ``evaluated``: metrics rows holding eval_* values."""
    tail = [eval_metrics(r) for r in evaluated[len(evaluated) // 2 :]]
    keys = set.intersection(*(set(t) for t in tail)) if tail else set()
    return {k: sum(t[k] for t in tail) / len(tail) for k in sorted(keys)}


def summarise(exp: Experiment, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final-round and best-over-rounds values of every eval metric (by the primary metric)."""
    primary = "eval_" + exp.task.primary_metric
    evaluated = [r for r in rows if primary in r]
    final = evaluated[-1] if evaluated else {}
    pick_best = min if exp.task.lower_is_better else max
    # a round whose metric is NaN (a diverged model's Pearson) is never the best; max() would keep or skip it by position
    scored = [r for r in evaluated if math.isfinite(r[primary])] or evaluated
    best = pick_best(scored, key=lambda r: r[primary]) if scored else {}
    # fed.personal_eval: each client's own model on its held-out examples, weighted by their number
    own = [{k[9:]: v for k, v in r.items() if k.startswith("personal_") and k != "personal_n"} for r in rows]
    own = [o for o in own if o]
    cfg = exp.cfg
    return {
        "task": exp.task.name,
        "method": "centralized" if cfg.fed.mode == "centralized" else cfg.fed.method,
        "partition": cfg.partition.scheme,
        "alpha": cfg.partition.alpha,
        "seed": cfg.seed,
        "primary_metric": exp.task.primary_metric,
        "lower_is_better": exp.task.lower_is_better,
        "rounds": len(rows),
        "final": eval_metrics(final),
        "best": eval_metrics(best),
        "best_round": best.get("round"),
        "last_half": last_half(evaluated),
        **({"personal_final": own[-1]} if own else {}),
        "train_s": sum(r["train_s"] for r in rows),
        # CPU seconds of client training, when every round recorded them (in-process runs)
        **({"train_cpu_s": sum(r["train_cpu_s"] for r in rows)} if rows and all("train_cpu_s" in r for r in rows) else {}),
        # the compute figures mean little without the machine that made them
        "hardware": exp.fm.placement.describe(),
        "aggregate_s": sum(r["aggregate_s"] for r in rows),
        "fold_s": sum(r["fold_s"] for r in rows),
        "eval_s": sum(r.get("eval_s", 0.0) for r in rows),
        # .get: rounds checkpointed by fedlora versions before these counters existed
        "train_steps": sum(r.get("train_steps", 0) for r in rows),
        "train_tokens": sum(r.get("train_tokens", 0) for r in rows),
        "bytes_down": sum(r["bytes_down"] for r in rows),
        "bytes_up": sum(r["bytes_up"] for r in rows),
        **(
            {"epsilon": rows[-1].get("epsilon"), "delta": exp.privacy.delta, "noise_multiplier": exp.privacy.noise_multiplier, "privacy": exp.privacy.mode}
            if exp.privacy is not None and rows
            else {}
        ),
    }


@contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder (flock on the folder itself, released when the
    process ends, however it ends): a second process pointed at the same folder is refused
    instead of interleaving checkpoints with the first. Where flock is missing (Windows) no lock."""
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # deepest first
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        fd = os.open(run_dir, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"another fedlora process is running in {run_dir}; wait for it, or give this run another name or output_dir") from None
            yield
        finally:
            os.close(fd)
    finally:
        for folder in created:  # refused before anything was written: leave no folder behind
            if any(folder.iterdir()):
                break
            folder.rmdir()


def evaluate_export(exp: Experiment, cfg: RunConfig, folder: Path) -> dict[str, float]:
    """The exported folder loaded as a user loads it (the pretrained base, then
    ``PeftModel.from_pretrained``) and evaluated on the run's evaluation set as every round is
    (:func:`~fedlora.engine.server.model_metrics`: a prompt-style run's label-word metrics too).
    A QLoRA run's folder is scored on the full-precision base (what a user without bitsandbytes
    loads): it reproduces the trained model only on the quantized one, so the two can differ."""
    from peft import PeftModel

    from ..models.hub import load_base
    from .server import model_metrics

    base = load_base(cfg.model.name, exp.task.num_labels, exp.task.is_regression, exp.causal, cfg.model.pair_encoder)
    with quiet_peft():
        model = PeftModel.from_pretrained(base, str(folder)).to(exp.fm.placement.device).eval()
    return model_metrics(exp, model, cfg.train.eval_batch_size)


def _swap_in(new: Path, target: Path) -> None:
    """Replace the folder ``target`` by ``new`` (renames: the old one is removed only once the new one is in place)."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    new.rename(target)
    if old.exists():
        shutil.rmtree(old)


def checked_run_dir(cfg: RunConfig) -> Path:
    """The run's folder, after the checks ``fedlora run`` makes before it writes anything there
    (the trackers can start; the folder is directly inside ``output_dir``)."""
    check_trackers(cfg.track.to)
    run_dir = Path(cfg.output_dir) / run_name(cfg)
    # validate() refuses such names; --overwrite deletes this folder (absolute, not resolved: a symlinked run folder is the user's)
    if Path(os.path.abspath(run_dir)).parent != Path(os.path.abspath(cfg.output_dir)):
        raise ConfigError(f"the run folder {run_dir} is not directly inside output_dir={cfg.output_dir}")
    return run_dir


def run_experiment(
    cfg: RunConfig, *, overwrite: bool = False, export: bool = True, plots: bool = True, engine: Callable[[Simulator, ServerState], ServerState] | None = None
) -> dict[str, Any]:
    """Run (or resume) one experiment; returns its summary.

    ``engine(server, state)`` drives the rounds from ``state`` to ``fed.rounds``
    through ``server.plan`` / ``server.finish``; the default trains every client
    in this process (``Simulator.run``), Flower's ServerApp passes its strategy.
    The run folder, checkpoints, metrics, plots and export are the same either way.
    """
    if engine is None and cfg.data.node_data:
        raise ConfigError("data.node_data=true: the training rows are the Flower nodes' own (data= in each node config); `fedlora run` has none: run on Flower")
    exp = build_experiment(cfg)  # every input error surfaces here, before any file is written
    run_dir = checked_run_dir(cfg)

    trackers = Trackers([], run_dir / "track.json", {})

    def on_round(sim: Simulator) -> None:
        writer.write_rows("metrics", sim.rounds)
        writer.write_rows("clients", sim.client_rows)
        if sim.samples:
            writer.write_rows("samples", sim.samples)
        trackers.log(sim.rounds)

    sim = Simulator(exp, run_dir, on_round=on_round)
    writer = RunWriter(run_dir)
    with run_folder_lock(run_dir):
        if overwrite:  # under the lock: a run still writing here keeps it, and this one is refused
            for item in run_dir.iterdir():
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        # A checkpoint (or config.yaml) of another configuration is refused here, before config.yaml is rewritten.
        state = sim.resume_or_init()
        # Before the run's own files change: a tracker that cannot start leaves them (summary.json too) as they
        # were (--overwrite above has emptied the folder already).
        if cfg.track.to:
            trackers = open_trackers(cfg.track.to, cfg.track.project, run_dir, config_to_dict(cfg))
        try:
            # Until this run writes its own, a summary here is stale: a run stopped before its end must not
            # look finished (the grid takes a summary as a finished cell).
            (run_dir / "summary.json").unlink(missing_ok=True)
            writer.write_config(config_to_dict(cfg))
            if exp.histogram.size:  # data.node_data: the server never sees the clients' labels
                writer.write_histogram(exp.histogram, exp.label_names)
                if plots:
                    plot_histogram(exp.histogram, exp.label_names, run_dir / "label_histogram.png")
            summary = _train_and_export(cfg, exp, sim, state, writer, engine, export=export, plots=plots, on_round=on_round)
        except BaseException:
            trackers.finish(None)
            raise
        trackers.finish(summary)
        return summary


def _train_and_export(
    cfg: RunConfig,
    exp: Experiment,
    sim: Simulator,
    state: ServerState,
    writer: RunWriter,
    engine: Callable[[Simulator, ServerState], ServerState] | None,
    *,
    export: bool,
    plots: bool,
    on_round: Callable[[Simulator], None],
) -> dict[str, Any]:
    """The rounds, then the summary, the exported adapter and the plots (run_experiment's body, under its lock)."""
    run_dir = writer.dir
    state = sim.run(state) if engine is None else engine(sim, state)
    on_round(sim)
    summary = summarise(exp, sim.rounds)
    if sim.received_final:  # fed.received_eval: the final global model on the clients' held-out examples
        summary["received_final"] = dict(sim.received_final)
        summary["received_final_clients"] = sim.received_final_clients
    if export:
        # Written beside the old folder and swapped in: a re-export stopped halfway leaves the old adapter whole.
        staging = run_dir / "adapter.partial"
        if staging.exists():
            shutil.rmtree(staging)
        report = export_peft_adapter(
            exp.fm,
            sim.total_delta(state),
            state.dense,
            cfg.model.name,
            exp.task.num_labels,
            exp.task.is_regression,
            staging,
            causal=exp.causal,
            rank_limit=cfg.model.export_rank,
        )
        _swap_in(staging, run_dir / "adapter")
        summary.update(report.as_dict())
        if cfg.model.export_rank > 0:  # what the truncation costs: the exported folder evaluated as a user loads it
            summary["export_metrics"] = evaluate_export(exp, cfg, run_dir / "adapter")
    if plots:
        metric = "eval_" + exp.task.primary_metric
        plot_metric(sim.rounds, metric, f"{summary['method']} on {exp.task.name} ({cfg.partition.scheme})", run_dir / "metrics.png")
        if exp.privacy is not None:  # the metric against the ε spent so far, round by round
            pts = [(r["epsilon"], r[metric]) for r in sim.rounds if metric in r and "epsilon" in r]
            curve = {summary["method"]: ([e for e, _ in pts], [v for _, v in pts])}
            plot_against_epsilon(curve, metric, f"{summary['method']}: {metric} against ε (δ = {exp.privacy.delta:g})", run_dir / "privacy.png")
    writer.write_json("summary.json", summary)
    return summary
