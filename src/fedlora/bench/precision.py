"""``fedlora bench precision``: fp32 against bf16 autocast, over whole runs.

For each seed the same config runs twice, ``train.precision=fp32`` then
``bf16`` (same data, partitions and batches: only the arithmetic differs), and
the command prints per run the training throughput (padded tokens per second of
client training, evaluation excluded) and the primary metric of the final round;
then the paired ratio of throughputs and the paired difference of the metric,
with a 95% t-interval over seeds (scipy), so "faster with no loss beyond noise"
can be read off.
"""

from __future__ import annotations

import argparse
import math
import tempfile

from ..config import load_config
from ..engine.run import run_experiment

PRECISIONS = ("fp32", "bf16")


def _interval(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for one value)."""
    from scipy import stats

    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def measure(config: str | None, overrides: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedlora-precision-") as tmp:
        for seed in seeds:
            for precision in PRECISIONS:
                cfg = load_config(
                    config, [*overrides, f"seed={seed}", f"train.precision={precision}", f"output_dir={tmp}", "progress=false", f"name={precision}-s{seed}"]
                )
                s = run_experiment(cfg, export=False, plots=False)
                metric = s["primary_metric"]
                rows.append(
                    {
                        "seed": seed,
                        "precision": precision,
                        "tokens_per_s": s["train_tokens"] / s["train_s"],
                        "train_s": s["train_s"],
                        "metric": metric,
                        "final": s["final"].get(metric, float("nan")),
                    }
                )
    return rows


def main(args: argparse.Namespace) -> int:
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    rows = measure(args.config, args.overrides, seeds)
    metric = rows[0]["metric"]
    print(f"{'seed':>4}  {'precision':9}  {'tokens/s':>9}  {'train s':>8}  final {metric}")
    for r in rows:
        print(f"{r['seed']:>4}  {r['precision']:9}  {r['tokens_per_s']:9.0f}  {r['train_s']:8.1f}  {r['final']:.4f}")
    by = {(r["seed"], r["precision"]): r for r in rows}
    speed = [by[s, "bf16"]["tokens_per_s"] / by[s, "fp32"]["tokens_per_s"] for s in seeds]
    delta = [by[s, "bf16"]["final"] - by[s, "fp32"]["final"] for s in seeds]
    (ms, hs), (md, hd) = _interval(speed), _interval(delta)
    print(f"bf16 ÷ fp32 throughput: {ms:.3f} ± {hs:.3f} (95% CI over {len(seeds)} paired seeds)")
    print(f"bf16 − fp32 final {metric}: {md:+.4f} ± {hd:.4f} (95% CI; {'no difference shown' if abs(md) <= hd else 'a difference'})")
    return 0
