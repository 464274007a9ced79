"""``fedlora compare``'s report: a markdown table (mean ± std over seeds), a plot and a JSON
of a grid's summaries (collected by ``engine/grid.py``). Reads summaries only: nothing here
runs a model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import atomic_write_text

if TYPE_CHECKING:
    from ..engine.grid import Cell

__all__ = ["markdown_table", "plot_grid", "write_report"]


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
