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
import tempfile

from ..config import load_config
from ..engine.run import run_experiment
from ..report.stats import mean_interval

PRECISIONS = ("fp32", "bf16")


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
    ratio, diff = mean_interval(speed), mean_interval(delta)
    if diff.n < 2:  # one seed: no interval, and no verdict
        print(f"bf16 ÷ fp32 throughput: {ratio.mean:.3f} (one seed: no interval)")
        print(f"bf16 − fp32 final {metric}: {diff.mean:+.4f} (one seed: no interval)")
        return 0
    print(f"bf16 ÷ fp32 throughput: {ratio.mean:.3f} ± {ratio.half:.3f} (95% CI over {len(seeds)} paired seeds)")
    verdict = "a difference" if diff.excludes_zero() else "no difference shown"
    print(f"bf16 − fp32 final {metric}: {diff.mean:+.4f} ± {diff.half:.4f} (95% CI; {verdict})")
    return 0
