"""``fedlora compare``: run or collect a grid (methods × partitions × seeds),
then write a markdown table (mean ± std over seeds) and a plot.

Method specs may carry options, for ablations: ``hexa``, ``hexa[drift_beta=0]``,
``hexa[restart=svd_sqrt,drift_beta=2]``, ``fra[fra_rounds=3]``, and
``centralized`` for the centralized baseline. Partition specs: ``iid``,
``dirichlet:0.1``, ``quantity:0.5``, ``pathological:1``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_write_text
from ..config import ConfigError, load_config

__all__ = ["Cell", "parse_method", "parse_partition", "grid_overrides", "collect", "markdown_table", "plot_grid", "write_report"]


@dataclass(frozen=True)
class Cell:
    method: str  # the spec as written, e.g. "hexa[drift_beta=0]"
    partition: str
    seed: int


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    m = re.fullmatch(r"([a-z_]+)(?:\[(.*)\])?", spec.strip())
    if not m:
        raise ConfigError(f"bad method spec {spec!r}; use name or name[key=value,...]")
    opts: dict[str, Any] = {}
    for item in filter(None, (m.group(2) or "").split(",")):
        if "=" not in item:
            raise ConfigError(f"bad option {item!r} in method spec {spec!r}; use key=value")
        k, v = item.split("=", 1)
        opts[k.strip()] = yaml.safe_load(v)
    return m.group(1), opts


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
    over = list(base_overrides) + parse_partition(cell.partition) + [f"seed={cell.seed}"]
    if name == "centralized":
        over += ["fed.mode=centralized"]
    else:
        over += [f"fed.method={name}", "fed.options=" + json.dumps(opts)]
    # Centralized training ignores the partition: one run per seed serves every column.
    where = "" if name == "centralized" else f"-{_slug(cell.partition)}"
    return over + [f"name=compare-{task}-{_slug(cell.method)}{where}-s{cell.seed}"]


def _run_cell(cfg, overwrite: bool) -> dict:
    from ..engine.run import run_experiment

    return run_experiment(cfg, overwrite=overwrite)


def collect(
    cells: list[Cell], config: str | None, base_overrides: list[str], run: bool, overwrite: bool = False, skip_missing: bool = False, jobs: int = 1
) -> dict[Cell, dict]:
    """Each cell's summary: read from its run folder, or run it first when ``run``
    (in ``jobs`` worker processes; give each ``threads`` = cores / jobs).
    ``skip_missing`` leaves unfinished cells out (the table shows how many seeds each has)."""
    from ..engine.run import run_name

    out: dict[Cell, dict] = {}
    todo: dict[Path, tuple[Any, list[Cell]]] = {}  # run folder → (config, cells it serves)
    task = load_config(config, list(base_overrides)).data.task  # once per grid, not per cell
    for cell in cells:
        cfg = load_config(config, grid_overrides(cell, base_overrides, task))
        run_dir = Path(cfg.output_dir) / run_name(cfg)
        summary_path = run_dir / "summary.json"
        if summary_path.exists() and not overwrite:
            summary = json.loads(summary_path.read_text())
            if summary.get("task") != cfg.data.task:
                raise ConfigError(f"{summary_path} is a run on task {summary.get('task')!r}, not {cfg.data.task!r}")
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
    if not out:
        raise ConfigError("no finished run for any cell of the grid")
    return {cell: out[cell] for cell in cells if cell in out}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def markdown_table(results: dict[Cell, dict], which: str = "best", scale: float = 100.0) -> str:
    """Rows = methods, columns = partitions, cells = mean ± std (n) of the primary metric."""
    methods = list(dict.fromkeys(c.method for c in results))
    parts = list(dict.fromkeys(c.partition for c in results))
    metric = next(iter(results.values()))["primary_metric"]
    lines = ["| method | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
    for m in methods:
        cells = []
        for p in parts:
            xs = [r[which][metric] * scale for c, r in results.items() if c.method == m and c.partition == p and metric in r[which]]
            if xs:
                mu, sd = _mean_std(xs)
                cells.append(f"{mu:.2f} ± {sd:.2f} ({len(xs)})")
            else:
                cells.append("–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_grid(results: dict[Cell, dict], which: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(dict.fromkeys(c.method for c in results))
    parts = list(dict.fromkeys(c.partition for c in results))
    metric = next(iter(results.values()))["primary_metric"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(methods) * len(parts) / 2 + 3), 4.0))
    width = 0.8 / len(parts)
    for j, p in enumerate(parts):
        mus, sds = [], []
        for m in methods:
            xs = [r[which][metric] * 100 for c, r in results.items() if c.method == m and c.partition == p and metric in r[which]]
            mu, sd = _mean_std(xs) if xs else (float("nan"), 0.0)
            mus.append(mu)
            sds.append(sd)
        ax.bar(np.arange(len(methods)) + j * width, mus, width, yerr=sds, capsize=2, label=p)
    ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2)
    ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"{which} {metric} (×100)")
    finite = [r[which][metric] * 100 for r in results.values() if metric in r[which]]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 5), min(100.0, max(finite) + 3))
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[Cell, dict], out_dir: Path, title: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = f"# {title}\n\n## Best over rounds\n\n" + markdown_table(results, "best") + "\n## Final round\n\n" + markdown_table(results, "final")
    atomic_write_text(out_dir / "results.md", text)
    rows = [
        {
            "method": c.method,
            "partition": c.partition,
            "seed": c.seed,
            **{f"best_{k}": v for k, v in r["best"].items()},
            **{f"final_{k}": v for k, v in r["final"].items()},
        }
        for c, r in results.items()
    ]
    atomic_write_text(out_dir / "results.json", json.dumps(rows, indent=1))
    plot_grid(results, "best", out_dir / "results.png")
    return out_dir / "results.md"
