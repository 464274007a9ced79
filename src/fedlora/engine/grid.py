"""The grid behind ``fedlora compare``: cells (method × partition × seed), the overrides of
each, and their summaries, read from finished run folders or run here first. Tables and
plots of the result are ``report/compare.py``'s.

Method specs may carry options, for ablations: ``hexa``, ``hexa[drift_beta=0]``,
``hexa[restart=svd_sqrt,drift_beta=2]``, ``fra[fra_rounds=3]``, and
``centralized`` for the centralized baseline; dotted keys override the config for that
method's cells only (``ffa[train.lr=3e-3]``, ``centralized[train.epochs=2]``). Partition specs: ``iid``,
``dirichlet:0.1``, ``quantity:0.5``, ``pathological:1``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, load_config
from .run import last_half, run_experiment, run_name
from .server import same_results

__all__ = ["Cell", "parse_method", "parse_partition", "grid_overrides", "shard_of", "parse_shard", "collect", "grid_status", "status_table"]


@dataclass(frozen=True)
class Cell:
    method: str  # the spec as written, e.g. "hexa[drift_beta=0]"
    partition: str
    seed: int


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    m = re.fullmatch(r"([^\[\]\s]+?)(?:\[(.*)\])?", spec.strip())  # a name, module:Class or file.py:Class, then options
    if not m:
        raise ConfigError(f"bad method spec {spec!r}; use name or name[key=value,...]")
    opts: dict[str, Any] = {}
    for item in filter(None, (m.group(2) or "").split(",")):
        if "=" not in item:
            raise ConfigError(f"bad option {item!r} in method spec {spec!r}; use key=value")
        k, v = item.split("=", 1)
        value = yaml.safe_load(v)
        # YAML 1.1 reads 1e-3 (no dot) as text: a method option gets the number (a config override, key.with.dots,
        # keeps its text, which the config's own parser reads and the run folder's name is made of)
        if "." not in k and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)
        opts[k.strip()] = value
    return m.group(1), opts


_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def parse_partition(spec: str) -> list[str]:
    scheme, _, arg = spec.partition(":")
    if scheme not in ("iid", "dirichlet", "dirichlet_class", "quantity", "pathological"):
        raise ConfigError(f"bad partition spec {spec!r}; use iid, dirichlet:<alpha>, dirichlet_class:<alpha>, quantity:<alpha> or pathological:<k>")
    out = [f"partition.scheme={scheme}"]
    if scheme in ("dirichlet", "dirichlet_class", "quantity"):
        out.append(f"partition.alpha={arg or '0.5'}")
    elif scheme == "pathological":
        out.append(f"partition.labels_per_client={arg or '1'}")
    return out


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", spec).strip("_")


def grid_overrides(cell: Cell, base_overrides: list[str], task: str) -> list[str]:
    """The overrides of one cell. The run name carries the task, so grids over different
    tasks may share one ``output_dir`` without reading each other's runs."""
    name, opts = parse_method(cell.method)
    # Dotted keys are config overrides of this method's cells (``ffa[train.lr=3e-3]``: FFA-LoRA
    # trains only B and its paper uses a larger learning rate); the others are method options.
    settings = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in opts.items() if "." in k]
    opts = {k: v for k, v in opts.items() if "." not in k}
    over = list(base_overrides) + parse_partition(cell.partition) + [f"seed={cell.seed}"] + settings
    if name == "centralized":
        if opts:
            raise ConfigError(f"method spec {cell.method!r}: centralized takes config overrides (train.lr=…) only, no method options")
        over += ["fed.mode=centralized"]
    else:
        over += [f"fed.method={name}", "fed.options=" + json.dumps(opts)]
    # Centralized training ignores the partition: one run per seed serves every column.
    where = "" if name == "centralized" else f"-{_slug(cell.partition)}"
    return over + [f"name=compare-{task}-{_slug(cell.method)}{where}-s{cell.seed}"]


def parse_shard(spec: str) -> tuple[int, int]:
    """``K/N`` → (K, N), 1 ≤ K ≤ N: this machine's share of a grid split over N machines."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ConfigError(f"--shard must be K/N with 1 ≤ K ≤ N (this machine's share of N), got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def shard_of(run_name: str, shards: int) -> int:
    """The shard (1 … ``shards``) that runs the run folder ``run_name`` (``…-s<seed>``): a hash of
    the name without its seed, plus the seed, modulo ``shards``. A cell's consecutive seeds go
    round the machines, so each machine gets a near-even share of every method (runs of one
    method cost alike; seeds 0, 3, 6 over 3 machines would all land on one);
    and a run's shard depends on its name alone, not on its place in the grid, so it keeps its
    shard when the grid grows (more seeds, methods or partitions) and machines that started on a
    smaller grid never train one run twice. A centralized run serves every partition: one folder,
    one shard."""
    stem, seed = run_name, 0
    if m := re.fullmatch(r"(.*)-s(\d+)", run_name):
        stem, seed = m.group(1), int(m.group(2))
    return (int.from_bytes(hashlib.sha256(stem.encode()).digest()[:8], "big") + seed) % shards + 1


def _run_cell(cfg, overwrite: bool) -> dict:
    return run_experiment(cfg, overwrite=overwrite)


def collect(
    cells: list[Cell],
    config: str | None,
    base_overrides: list[str],
    run: bool,
    overwrite: bool = False,
    skip_missing: bool = False,
    jobs: int = 1,
    shard: tuple[int, int] | None = None,
) -> dict[Cell, dict]:
    """Each cell's summary: read from its run folder, or run it first when ``run``
    (in ``jobs`` worker processes; give each ``threads`` = cores / jobs).
    ``skip_missing`` leaves unfinished cells out (the table shows how many seeds each has).
    ``shard`` = (K, N) reads and runs only the cells whose run folder is in shard K of N
    (``shard_of``); the others are left out, and an empty share is no error."""
    out: dict[Cell, dict] = {}
    todo: dict[Path, tuple[Any, list[Cell]]] = {}  # run folder → (config, cells it serves)
    folders: dict[Cell, Path] = {}
    task = load_config(config, list(base_overrides)).data.task  # once per grid, not per cell
    for cell in cells:
        cfg = load_config(config, grid_overrides(cell, base_overrides, task))
        run_dir = Path(cfg.output_dir) / run_name(cfg)
        if shard is not None and shard_of(run_dir.name, shard[1]) != shard[0]:
            continue
        folders[cell] = run_dir
        summary_path = run_dir / "summary.json"
        if summary_path.exists() and not overwrite:
            summary = json.loads(summary_path.read_text())
            if summary.get("task") != cfg.data.task:
                raise ConfigError(f"{summary_path} is a run on task {summary.get('task')!r}, not {cfg.data.task!r}")
            if not _ran_as_configured(run_dir, cfg):
                # A finished run of another configuration under this cell's name: never report it as this cell.
                raise ConfigError(
                    f"{run_dir} holds a run of {cell.method} / {cell.partition} / seed {cell.seed} with a different configuration; "
                    "give the grid its own output_dir, or --overwrite"
                )
            if "last_half" not in summary and (run_dir / "metrics.jsonl").is_file():  # a run summarised before the field existed
                rows = _metric_rows(run_dir)
                summary["last_half"] = last_half([r for r in rows if "eval_" + summary["primary_metric"] in r])
            out[cell] = summary
        elif run:
            # one centralized run per seed serves every partition column
            todo.setdefault(run_dir, (cfg, []))[1].append(cell)
        elif not skip_missing:
            raise ConfigError(f"no finished run for {cell.method} / {cell.partition} / seed {cell.seed} at {summary_path}")
    if jobs > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a fresh interpreter per worker, no forked torch thread pools.
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [(pool.submit(_run_cell, cfg, overwrite), served) for cfg, served in todo.values()]
            for fut, served in futures:
                out.update(dict.fromkeys(served, fut.result()))
    else:
        for cfg, served in todo.values():
            out.update(dict.fromkeys(served, _run_cell(cfg, overwrite)))
    if not out and shard is None:
        raise ConfigError("no finished run for any cell of the grid")
    return {cell: _with_curve(out[cell], folders[cell]) for cell in cells if cell in out}


def _with_curve(summary: dict, run_dir: Path) -> dict:
    """The summary and its run's learning curve, ``curve``: [round, primary metric] of every evaluated round."""
    key = "eval_" + summary["primary_metric"]
    return {**summary, "curve": [[r["round"], r[key]] for r in _metric_rows(run_dir) if r.get(key) is not None]}


def _ran_as_configured(run_dir: Path, cfg) -> bool:
    """Whether the folder's stored configuration gives the results ``cfg`` would (no config.yaml: it proves nothing)."""
    stored = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else None
    return isinstance(stored, dict) and same_results(stored, cfg)


def _metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def grid_status(cells: list[Cell], config: str | None, base_overrides: list[str], shard: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Where each run of a grid stands, without running or loading anything: one row per run
    folder (a centralized run serves every partition; with ``shard`` = (K, N), only shard K's),
    in grid order, with its ``state``:
    ``finished``, ``running or stopped`` (rounds in metrics.jsonl, resumable), ``not started``, or
    ``other configuration`` (a finished folder under the cell's name that the grid would refuse)."""
    rows: dict[Path, dict[str, Any]] = {}
    task = load_config(config, list(base_overrides)).data.task
    for cell in cells:
        cfg = load_config(config, grid_overrides(cell, base_overrides, task))
        run_dir = Path(cfg.output_dir) / run_name(cfg)
        if run_dir in rows or (shard is not None and shard_of(run_dir.name, shard[1]) != shard[0]):
            continue
        done = _metric_rows(run_dir)
        row: dict[str, Any] = {
            "run": run_dir.name,
            "mode": cfg.fed.mode,
            "rounds": len(done),
            "planned": cfg.fed.rounds,
            "train_s": sum(r.get("train_s", 0.0) for r in done),
            # CPU seconds when every round recorded them: a rate that other jobs and pauses do not inflate
            "cpu_s": sum(r["train_cpu_s"] for r in done) if done and all("train_cpu_s" in r for r in done) else None,
        }
        if (run_dir / "summary.json").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())
            row |= {"state": "finished" if _ran_as_configured(run_dir, cfg) else "other configuration", "hardware": summary.get("hardware", "not recorded")}
        else:
            row["state"] = "running or stopped" if done else "not started"
        rows[run_dir] = row
    return list(rows.values())


def status_table(rows: list[dict[str, Any]]) -> str:
    """The status rows as Markdown, then the totals and what is left: rounds not yet trained
    times the mean training seconds per round of the finished runs (CPU seconds where every one
    recorded them, else wall-clock; per machine they ran on:
    an estimate for that machine, one process per run), federated and centralized rounds each
    at their own mode's rate (a centralized round of a recipe trains on every client's examples
    in one process, not at a federated round's rate); with none of a mode finished, its runs under way
    (machine unknown: assumed this one) or else the other mode's."""
    lines = ["| run | state | rounds | training s |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['state']} | {r['rounds']}/{r['planned']} | {r['train_s']:.0f} |" for r in rows]
    count = {state: sum(r["state"] == state for r in rows) for state in ("finished", "running or stopped", "not started", "other configuration")}
    lines.append("")
    lines.append(", ".join(f"{n} {state}" for state, n in count.items() if n) + f" ({len(rows)} runs)")

    # a folder of another configuration is trained again from its first round (under --overwrite)
    def rounds_left(r: dict[str, Any]) -> int:
        return 0 if r["state"] == "finished" else r["planned"] if r["state"] == "other configuration" else max(r["planned"] - r["rounds"], 0)

    left = sum(rounds_left(r) for r in rows)
    finished = [r for r in rows if r["state"] == "finished" and r["rounds"]]
    groups = {hw: [r for r in finished if r["hardware"] == hw] for hw in dict.fromkeys(r["hardware"] for r in finished)}
    if not groups:  # nothing finished yet: the runs under way are the only measure
        groups = {"runs in progress, machine not recorded": [r for r in rows if r["state"] == "running or stopped" and r["rounds"]]}
    for hw, on in groups.items():
        if not on:
            continue
        seconds, parts = 0.0, []
        for mode in dict.fromkeys(r["mode"] for r in rows):
            todo = sum(rounds_left(r) for r in rows if r["mode"] == mode)
            same = [r for r in on if r["mode"] == mode]
            under_way = [r for r in rows if r["mode"] == mode and r["state"] == "running or stopped" and r["rounds"]]
            basis, which = (same, "") if same else (under_way, "unfinished ") if under_way else (on, "other-mode ")
            key, unit = ("cpu_s", "CPU s") if all(r.get("cpu_s") is not None for r in basis) else ("train_s", "s")
            per_round = sum(r[key] for r in basis) / sum(r["rounds"] for r in basis)
            seconds += todo * per_round
            if todo:
                parts.append(f"{mode}: {todo} × {per_round:.0f} {unit} from {len(basis)} {which}runs")
        lines.append(f"{left} rounds left, ≈ {seconds / 3600:.1f} process-hours on {hw} ({'; '.join(parts)})")
    return "\n".join(lines) + "\n"
