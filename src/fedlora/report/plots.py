"""PNG plots with matplotlib's non-interactive Agg backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib
from matplotlib.ticker import MaxNLocator

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_metric", "plot_histogram", "plot_curves", "curves_figure", "plot_against_epsilon"]


def curves_figure(curves: dict[str, tuple[list[int], list[float]]], ylabel: str, title: str):
    """(figure, axes) of one line per curve over rounds; rounds are whole numbers, so the
    round axis gets integer ticks only (matplotlib would put ticks at 1.5, 2.5, ...)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig, ax


def plot_curves(curves: dict[str, tuple[list[int], list[float]]], ylabel: str, title: str, path: Path) -> None:
    fig, _ = curves_figure(curves, ylabel, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_metric(rows: list[dict], metric: str, title: str, path: Path) -> None:
    pts = [(r["round"], r[metric]) for r in rows if r.get(metric) is not None]
    plot_curves({metric: ([p[0] for p in pts], [p[1] for p in pts])}, metric, title, path)


def plot_histogram(hist: np.ndarray, label_names: list[str], path: Path) -> None:
    """Stacked bars: examples per label for every client."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * hist.shape[0] + 2), 3.6))
    bottom = np.zeros(hist.shape[0])
    names = label_names or [f"bin{j}" for j in range(hist.shape[1])]
    for j in range(hist.shape[1]):
        ax.bar(np.arange(hist.shape[0]), hist[:, j], bottom=bottom, label=names[j])
        bottom += hist[:, j]
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    ax.set_xticks(np.arange(hist.shape[0]))
    ax.legend(fontsize=7)
    ax.set_title("label histogram per client")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_against_epsilon(curves: dict[str, tuple[list[float], list[float]]], ylabel: str, title: str, path: Path) -> None:
    """One line per curve of a metric against the privacy spent ε (a run's rounds, or a grid's
    target budgets); ε = ∞ (no DP) is drawn as a dashed horizontal line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, (eps, y) in curves.items():
        finite = [(e, v) for e, v in zip(eps, y) if np.isfinite(e)]
        line = ax.plot([e for e, _ in finite], [v for _, v in finite], marker="o", markersize=3, label=label)[0] if finite else None
        for e, v in zip(eps, y):
            if not np.isfinite(e):
                ax.axhline(v, linestyle="--", linewidth=0.8, color=line.get_color() if line else None, label=f"{label} (no DP)" if not finite else None)
    ax.set_xlabel("ε (δ fixed)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
