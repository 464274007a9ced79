"""``fedlora compare``'s report: markdown tables (means with 95% intervals over seeds,
differences from a baseline paired by seed, compute per run), a plot with 95% intervals and a
JSON of a grid's summaries (collected by ``engine/grid.py``). Reads summaries only: nothing
here runs a model; the statistics are ``report/stats.py``'s."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import atomic_write_text
from ..config import ConfigError
from .stats import Interval, finite_interval, holm, mean_interval, paired_interval, paired_p_value

if TYPE_CHECKING:
    from ..engine.grid import Cell

WHICH = {"last_half": "second-half mean", "final": "final-round value", "best": "best-round value"}  # of the primary metric

__all__ = [
    "markdown_table",
    "paired_table",
    "pairwise_verdicts",
    "privacy_tables",
    "compute_table",
    "plot_grid",
    "round_bands",
    "plot_round_curves",
    "write_report",
]


def _values(results: dict[Cell, dict], which: str, method: str, partition: str, scale: float) -> dict[int, float]:
    """{seed: value of the primary metric} of one method in one partition."""
    metric = next(iter(results.values()))["primary_metric"]
    return {c.seed: r[which][metric] * scale for c, r in results.items() if c.method == method and c.partition == partition and metric in r.get(which, {})}


def _lower_is_better(results: dict[Cell, dict]) -> bool:
    """From the runs' summaries (the task's own flag); summaries written before it existed: by the metric's name."""
    first = next(iter(results.values()))
    return bool(first.get("lower_is_better", first["primary_metric"] in ("loss", "perplexity")))


def metric_scale(results: dict[Cell, dict]) -> float:
    """100 for a fraction (accuracy, F1, a correlation: shown as points), 1 for a loss or a perplexity."""
    return 1.0 if _lower_is_better(results) else 100.0


def _scaled(scale: float) -> str:
    return f" (×{scale:g})" if scale != 1 else ""


def _fmt(iv: Interval, seeds: tuple[int, int] | None = None) -> str:
    """mean ± half-width (n), noting what n leaves out: diverged seeds, no spread, and for a paired
    difference (``seeds``: how many each side has) the seeds only one side has."""
    notes = [f"{iv.diverged} diverged"] if iv.diverged else []
    if iv.n > 1 and iv.half == 0:
        notes.append("no spread")
    if seeds is not None and iv.n + iv.diverged < max(seeds):
        notes.append(f"pairs of {seeds[0]} and {seeds[1]} seeds")
    if iv.n == 0:
        return "– (" + "; ".join(notes) + ")"
    half = "n/a" if math.isnan(iv.half) else f"{iv.half:.2f}"
    return f"{iv.mean:.2f} ± {half} ({'; '.join([str(iv.n), *notes])})"


def _paired_cell(iv: Interval | None, lower: bool, seeds: tuple[int, int] | None = None) -> str:
    """A paired difference's cell: mean ± half-width (n pairs), marked ahead / behind only where the
    95% interval excludes zero and no shared seed diverged (``lower``: a lower metric is better, as for a loss)."""
    if iv is None:
        return "–"
    verdict = (" **ahead**" if (iv.mean < 0) == lower else " **behind**") if iv.excludes_zero() else ""
    return _fmt(iv, seeds) + verdict


def markdown_table(results: dict[Cell, dict], which: str = "best", scale: float = 100.0) -> str:
    """Rows = methods, columns = partitions, cells = mean ± half-width of the 95% interval (n seeds)."""
    methods = list(dict.fromkeys(c.method for c in results))
    parts = list(dict.fromkeys(c.partition for c in results))
    lines = ["| method | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
    for m in methods:
        cells = []
        for p in parts:
            xs = _values(results, which, m, p, scale)
            cells.append(_fmt(finite_interval(list(xs.values()))) if xs else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_table(results: dict[Cell, dict], baseline: str, which: str = "best", scale: float = 100.0) -> str:
    """Each method minus ``baseline``, paired by seed: mean ± half-width of the 95% interval
    (n pairs), marked ahead / behind only where the interval excludes zero."""
    methods = [m for m in dict.fromkeys(c.method for c in results) if m != baseline]
    parts = list(dict.fromkeys(c.partition for c in results))
    lower = _lower_is_better(results)
    lines = ["| method − " + baseline + " | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
    for m in methods:
        cells = []
        for p in parts:
            x, b = _values(results, which, m, p, scale), _values(results, which, baseline, p, scale)
            cells.append(_paired_cell(paired_interval(x, b), lower, (len(x), len(b))))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pairwise_verdicts(results: dict[Cell, dict], which: str = "last_half", scale: float = 100.0) -> str:
    """Every pair of methods in each partition, paired by seed, Holm-adjusted over that partition's
    pairs: a table of the pairs whose 95% interval excludes zero, better method first, and whether the
    call survives the adjustment (what "real" means with many comparisons at once)."""
    lower = _lower_is_better(results)
    methods = list(dict.fromkeys(c.method for c in results))
    parts = list(dict.fromkeys(c.partition for c in results))
    rows, family = [], {}
    for p in parts:
        vals = {m: _values(results, which, m, p, scale) for m in methods}
        pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1 :]]
        stats = [(a, b, paired_interval(vals[a], vals[b]), paired_p_value(vals[a], vals[b])) for a, b in pairs]
        # pairs with a test: two or more finite differences with some spread (stats.py says why the others decide nothing)
        stats = [(a, b, iv, pv) for a, b, iv, pv in stats if iv is not None and pv is not None and math.isfinite(pv)]
        if stats:
            family[p] = len(stats)
        adjusted = holm([pv for *_, pv in stats])
        for (a, b, iv, pv), adj in zip(stats, adjusted, strict=True):
            if not iv.excludes_zero():
                continue
            if (iv.mean < 0) != lower:  # b is the better one: report it first (a positive difference, or negative for a loss)
                a, b, iv = b, a, Interval(-iv.mean, iv.half, iv.n)
            verdict = "yes" if adj < 0.05 else "no"
            rows.append(f"| {p} | {a} − {b} | {_fmt(iv, (len(vals[a]), len(vals[b])))} | {pv:.2g} | {adj:.2g} | {verdict} |")
    if not family:
        return "No pair of methods has a test yet (two or more shared seeds, none diverged, some spread): no comparison.\n"
    sizes = ", ".join(f"{m} in {p}" for p, m in family.items())
    head = (
        f"Every pair of methods within each partition with a test (two or more shared seeds, none diverged, some spread: "
        f"{sizes}; Holm's family is those pairs of each partition), the {WHICH.get(which, which)} of the metric, paired by seed; "
        "better method first. Listed: the pairs whose 95% interval "
        "excludes zero; the last column says whether the call survives Holm's adjustment over the partition's pairs "
        "(p < 0.05 after it). Every other pair: no difference shown at this number of seeds.\n\n"
    )
    if not rows:
        return head + "No pair differs with confidence.\n"
    table = "| partition | difference | mean ± 95% interval (n) | p | Holm p | real after Holm |\n|---|---|---|---|---|---|\n"
    return head + table + "\n".join(rows) + "\n"


def _privacy_column(spec: str) -> tuple[str, float | None, str]:
    """(method spec without its ``privacy.*`` options: the row; its target ε, ∞ without DP, None
    when the spec gives the noise instead; its other ``privacy.*`` options: mode, clip, δ, z)."""
    name, _, opts = spec.partition("[")
    items = [o for o in opts.rstrip("]").split(",") if o] if opts else []
    kept = [o for o in items if not o.startswith("privacy.")]
    private = [o for o in items if o.startswith("privacy.")]
    target = [float(o.split("=", 1)[1]) for o in private if o.startswith("privacy.target_epsilon=")]
    others = ", ".join(o.removeprefix("privacy.") for o in private if not o.startswith("privacy.target_epsilon="))
    base = name + (f"[{','.join(kept)}]" if kept else "")
    return base, (target[0] if target else None if private else math.inf), others


def _span(xs: list[float]) -> str:
    """``lo–hi`` at three significant figures, one figure where they agree."""
    lo, hi = f"{min(xs):.3g}", f"{max(xs):.3g}"
    return lo if lo == hi else f"{lo}–{hi}"


def privacy_tables(results: dict[Cell, dict], baseline: str, which: str = "final", scale: float = 100.0) -> str:
    """A DP grid read by ε: rows = methods without their ``privacy.*`` options, columns = the target ε (with the
    other ``privacy.*`` settings where two columns differ in them: local and client DP never share a column), or
    the settings of a spec that gives the noise instead (the ε its runs spent in the header); ∞ = no DP. Three tables: the metric (mean ± 95% interval over seeds); the cost of privacy, each
    cell minus the same method without DP at the same seed; and each method minus ``baseline`` (its spec
    without ``privacy.*``) at the same ε and seed. Paired intervals are marked ahead / behind only where they
    exclude zero. One table per partition column of the grid, side by side in the rows' labels."""
    metric = next(iter(results.values()))["primary_metric"]
    lower = _lower_is_better(results)
    NO_DP = "ε = ∞ (no DP)"
    values: dict[tuple[str, str, str], dict[int, float]] = {}  # (row, partition, column) → {seed: value}
    spent: dict[str, list[float]] = {}
    target_of: dict[str, float | None] = {}
    columns = {_privacy_column(c.method)[1:] for c in results}
    # a column is its target ε; the other privacy options join its label only where columns differ in them
    shared = len({o for e, o in columns if e is not None and e != math.inf}) <= 1
    for c, r in results.items():
        if metric not in r.get(which, {}):
            continue
        base, eps, others = _privacy_column(c.method)
        if eps == math.inf:
            col = NO_DP
        elif eps is None:  # the noise given, not a target ε: the column is those settings (ε spent in its header)
            col = others
        else:
            col = f"ε = {eps:g}" + ("" if shared else f" ({others})")
        values.setdefault((base, c.partition, col), {})[c.seed] = r[which][metric] * scale
        if r.get("epsilon") is not None and eps != math.inf:
            spent.setdefault(col, []).append(float(r["epsilon"]))
        target_of[col] = eps

    def order(col: str) -> tuple[float, str]:  # by the target ε, else by the mean ε its runs spent; no DP last
        eps = target_of[col]
        return (eps if eps is not None else sum(spent[col]) / len(spent[col]) if col in spent else math.inf, col)

    bases = list(dict.fromkeys(k[0] for k in values))
    parts = list(dict.fromkeys(k[1] for k in values))
    epsilons = sorted({k[2] for k in values}, key=order)
    ref = _privacy_column(baseline)[0]
    heads = [col + (f" (spent {_span(spent[col])})" if col in spent else "") for col in epsilons]

    def table(label: str, cell) -> str:
        lines = [f"| {label} | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
        for b in bases:
            for p in parts:
                row = b if len(parts) == 1 else f"{b} ({p})"
                lines.append(f"| {row} | " + " | ".join(cell(b, p, e) for e in epsilons) + " |")
        return "\n".join(lines) + "\n"

    def mean_cell(b: str, p: str, e: str) -> str:
        xs = values.get((b, p, e))
        return _fmt(finite_interval(list(xs.values()))) if xs else "–"

    def paired_cell(x: dict[int, float] | None, y: dict[int, float] | None) -> str:
        return _paired_cell(paired_interval(x, y) if x and y else None, lower, (len(x), len(y)) if x and y else None)

    text = f"{metric.capitalize()}{_scaled(scale)} by ε, {WHICH.get(which, which)}:\n\n" + table("method", mean_cell)
    text += "\nThe cost of privacy: each ε minus the same method without DP, paired by seed:\n\n"
    text += table("method", lambda b, p, e: "–" if e == NO_DP else paired_cell(values.get((b, p, e)), values.get((b, p, NO_DP))))
    text += f"\nEach method minus {ref} at the same ε, paired by seed:\n\n"
    text += table(f"method − {ref}", lambda b, p, e: "–" if b == ref else paired_cell(values.get((b, p, e)), values.get((ref, p, e))))
    return text


def compute_table(results: dict[Cell, dict]) -> str:
    """Compute per run, mean over the runs of each method and machine (``summary.json``'s
    ``hardware``; runs finished before it existed: "not recorded"): client training seconds,
    padded tokens trained on, optimiser steps, and aggregation seconds; on a CPU also the CPU
    seconds of training (every thread; not inflated by other jobs or pauses, "–" where a run did not
    record them). Seconds from two machines are never averaged together."""
    lines = ["| method | hardware | runs | training s | training CPU s | tokens | steps | aggregation s |", "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}  # in the grid's method order, then machines as met
    for m in dict.fromkeys(c.method for c in results):
        for c, r in results.items():
            if c.method == m:
                groups.setdefault((m, r.get("hardware", "not recorded")), []).append(r)
    for (m, hw), rs in groups.items():
        mean = {key: sum(r.get(key, 0.0) for r in rs) / len(rs) for key in ("train_s", "train_tokens", "train_steps", "aggregate_s")}
        cpu = f"{sum(r['train_cpu_s'] for r in rs) / len(rs):.0f}" if all("train_cpu_s" in r for r in rs) else "–"
        lines.append(
            f"| {m} | {hw} | {len(rs)} | {mean['train_s']:.0f} | {cpu} | {mean['train_tokens']:.0f} | {mean['train_steps']:.0f} | {mean['aggregate_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot_grid(results: dict[Cell, dict], which: str, path: Path) -> tuple[float, float]:
    """results.png: a bar per method and partition with its 95% interval (none for one seed); returns the y-axis limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(dict.fromkeys(c.method for c in results))
    parts = list(dict.fromkeys(c.partition for c in results))
    metric = next(iter(results.values()))["primary_metric"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(methods) * len(parts) / 2 + 3), 4.0))
    width = 0.8 / len(parts)
    scale = metric_scale(results)
    ends: list[float] = []
    for j, p in enumerate(parts):
        mus, halves = [], []
        for m in methods:
            xs = list(_values(results, which, m, p, scale).values())
            iv = finite_interval(xs) if xs else Interval(math.nan, math.nan, 0)
            mus.append(iv.mean)
            halves.append(iv.half)  # NaN (one seed: no interval) draws no bar rather than a cap at the mean
            ends += [v for v in (iv.low, iv.high) if math.isfinite(v)] or ([iv.mean] if math.isfinite(iv.mean) else [])
        ax.bar(np.arange(len(methods)) + j * width, mus, width, yerr=halves, capsize=2, label=p)
    ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2)
    ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"{metric}{_scaled(scale)}, {WHICH.get(which, which)}, 95% interval", fontsize=8)
    if ends and scale == 100:  # points of a fraction (a correlation may be negative): every interval in view, at most to 100
        low = min(ends) - 5
        ax.set_ylim(max(0.0, low) if min(ends) >= 0 else max(-100.0, low), min(100.0, max(ends) + 3))
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    limits = ax.get_ylim()
    plt.close(fig)
    return float(limits[0]), float(limits[1])


def round_bands(results: dict[Cell, dict], partition: str, scale: float = 100.0) -> dict[str, tuple[list[int], list[Interval]]]:
    """Per method, the rounds every seed of it evaluated and there the mean over seeds with its 95%
    interval (the learning curves with their bands; ``curve`` from each run's metrics)."""
    bands: dict[str, tuple[list[int], list[Interval]]] = {}
    for m in dict.fromkeys(c.method for c in results):
        curves = [dict((int(t), v) for t, v in r.get("curve", [])) for c, r in results.items() if c.method == m and c.partition == partition]
        shared = sorted(set.intersection(*(set(cv) for cv in curves))) if curves else []
        if shared:
            bands[m] = (shared, [mean_interval([cv[t] * scale for cv in curves]) for t in shared])
    return bands


def plot_round_curves(results: dict[Cell, dict], path: Path) -> None:
    """curves.png: one panel per partition, the primary metric against the round for each method,
    mean over seeds with its 95% band: how fast each converges and how much it swings between rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    parts = list(dict.fromkeys(c.partition for c in results))
    metric = next(iter(results.values()))["primary_metric"]
    fig, axes = plt.subplots(1, len(parts), figsize=(4.6 * len(parts), 3.8), squeeze=False, sharey=True)
    scale = metric_scale(results)
    for ax, p in zip(axes[0], parts):
        for m, (rounds, ivs) in round_bands(results, p, scale).items():
            mean = [iv.mean for iv in ivs]
            line = ax.plot(rounds, mean, marker="o", markersize=2.5, label=f"{m} (n={ivs[0].n})")[0]
            if ivs[0].n > 1:
                ax.fill_between(rounds, [iv.low for iv in ivs], [iv.high for iv in ivs], color=line.get_color(), alpha=0.15)
        ax.set_title(p, fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric}{_scaled(scale)}, mean over seeds, 95% band", fontsize=8)
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[Cell, dict], out_dir: Path, title: str, baseline: str | None = None) -> Path:
    """results.md (means with 95% intervals; differences from ``baseline`` paired by seed;
    compute per run), results.json (one row per run), results.png (bars with 95% intervals) and
    curves.png (the metric by round, mean over seeds with its 95% band)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(c.method for c in results))
    if baseline is None:
        baseline = "fedit" if "fedit" in methods else methods[0]
    elif baseline not in methods:
        raise ConfigError(f"--baseline {baseline!r} is not one of the grid's methods ({', '.join(methods)})")
    scale = metric_scale(results)
    metric = next(iter(results.values()))["primary_metric"]
    note = (
        f"Cells: {metric}{_scaled(scale)}, mean ± half-width of the 95% interval (Student's t over seeds; n in brackets). "
        f"Differences: each method minus {baseline} at the same seed (same partition, data and batches), "
        "called ahead or behind where that one interval excludes zero (unadjusted: with many comparisons some such calls "
        'are chance; "Which differences are real" adjusts for them).\n'
    )
    text = f"# {title}\n\n{note}"
    # "cpu: <model>, fp32": the arithmetic each run trained in
    precisions = Counter(hw.rsplit(", ", 1)[1] for r in results.values() if ", " in (hw := r.get("hardware", "")))
    if len(precisions) > 1:
        counts = ", ".join(f"{k}: {n} runs" for k, n in sorted(precisions.items()))
        text += f"**The runs trained at more than one precision ({counts}):** the tables pool them, pairs included.\n"
    text += (
        "Three measures of each run: the mean over the second half of its evaluated rounds (first: under label skew a "
        "federated model swings from round to round, and this averages the swing away), the final round, and the best "
        "round (optimistic: a maximum chosen on the evaluation set itself).\n"
    )
    primary = "last_half" if all("last_half" in r for r in results.values()) else "final"
    text += "\n## Which differences are real\n\n" + pairwise_verdicts(results, primary, scale)
    for which, heading in (("last_half", "Mean over the second half of the rounds"), ("final", "Final round"), ("best", "Best over rounds")):
        if which == "last_half" and not any("last_half" in r for r in results.values()):
            continue
        text += f"\n## {heading}\n\n" + markdown_table(results, which, scale)
        text += f"\n### Paired difference from {baseline} ({which})\n\n" + paired_table(results, baseline, which, scale)
    for key, heading, what in (
        (
            "personal_final",
            "Personalised models, final round",
            "Each client's own model (FedSA-LoRA keeps B and the head on the client) on examples of its own held out of its "
            "training (`fed.personal_eval`), the mean weighted by their number: what FedSA-LoRA's published figures are, not one "
            "global model. Runs without personal evaluation show –.",
        ),
        (
            "received_final",
            "The final model on the clients' own examples",
            "The final model as the clients the next round would sample receive it, scored on examples of their own held out of "
            "training (`fed.received_eval`), the mean weighted by their number: federated evaluation, beside the server's "
            "evaluation set above. Runs without it show –.",
        ),
    ):
        if any(key in r for r in results.values()):
            text += f"\n## {heading}\n\n{what}\n\n" + markdown_table(results, key, scale)
    if any(r.get("epsilon") is not None for r in results.values()):
        text += ("\n## Privacy–utility\n\nThe final round's model is the one whose ε is accounted. ") + privacy_tables(results, baseline, "final", scale)
    text += "\n## Compute per run (mean)\n\n" + compute_table(results)
    atomic_write_text(out_dir / "results.md", text)
    rows = [
        {
            "method": c.method,
            "partition": c.partition,
            "seed": c.seed,
            **{f"best_{k}": v for k, v in r["best"].items()},
            **{f"final_{k}": v for k, v in r["final"].items()},
            **{f"last_half_{k}": v for k, v in r.get("last_half", {}).items()},
            **{f"personal_final_{k}": v for k, v in r.get("personal_final", {}).items()},
            **{f"received_final_{k}": v for k, v in r.get("received_final", {}).items()},
            **{k: r[k] for k in ("train_s", "train_cpu_s", "train_tokens", "train_steps", "aggregate_s", "hardware", "epsilon", "curve") if k in r},
        }
        for c, r in results.items()
    ]
    atomic_write_text(out_dir / "results.json", json.dumps(rows, indent=1))
    plot_grid(results, "last_half" if all("last_half" in r for r in results.values()) else "final", out_dir / "results.png")
    if any(r.get("curve") for r in results.values()):
        plot_round_curves(results, out_dir / "curves.png")
    if any("epsilon" in r for r in results.values()):
        plot_epsilon_grid(results, out_dir / "results_epsilon.png")
    return out_dir / "results.md"


def plot_epsilon_grid(results: dict[Cell, dict], path: Path) -> None:
    """Final metric against ε (the spec's target, else what its runs spent), one line per method and
    privacy setting (its cells without DP at ε = ∞), means over seeds: the privacy–utility curve."""
    from .plots import plot_against_epsilon

    metric = next(iter(results.values()))["primary_metric"]
    scale = metric_scale(results)
    # a line per method spec without its target ε (its other privacy settings kept: local and client DP are two
    # lines); the spec's run without DP is the ε = ∞ point of each of its lines
    private: dict[tuple[str, str, str], dict[float, list[float]]] = {}
    plain: dict[tuple[str, str], list[float]] = {}
    for c, r in results.items():
        base, target, others = _privacy_column(c.method)
        value = r["final"][metric] * scale
        if target == math.inf:
            plain.setdefault((base, c.partition), []).append(value)
        elif target is not None or r.get("epsilon") is not None:  # at its target ε (the seeds' spent ε differ a little), else the ε spent
            x = target if target is not None else round(float(r["epsilon"]), 2)
            private.setdefault((base, others, c.partition), {}).setdefault(x, []).append(value)
    several = len({p for *_, p in private}) > 1
    curves = {}
    for (base, others, part), by_eps in private.items():
        if (base, part) in plain:
            by_eps = {**by_eps, math.inf: plain[(base, part)]}
        eps = sorted(by_eps)
        label = base + (f" [{others}]" if len({o for _, o, _ in private}) > 1 else "") + (f" ({part})" if several else "")
        curves[label] = (eps, [sum(by_eps[e]) / len(by_eps[e]) for e in eps])
    plot_against_epsilon(curves, f"final {metric}{_scaled(scale)}, mean over seeds", "privacy–utility", path)
