"""``fedlora bench overhead``: the cost of federation itself.

Runs the same config twice — federated, then centralized over the same
examples with the same model, rounds and local epochs — and prints

    overhead = (Σ client time + aggregation + folding) / centralized training time

with evaluation excluded (``fed.eval_every`` is set past the last round; the
final round's evaluation is timed separately and not counted). Client time
includes swapping each client's adapters, head and starting point in and out
of the one shared base model.

Federated clients do more arithmetic than centralized training on the same
examples, for two reasons that belong to the data, not the engine: each client
length-buckets only its own examples (so its batches carry more padding), and
each client's last batch may be partial (so there are more optimiser steps).
The command therefore also prints the padded tokens and steps of both modes,
and the overhead per padded token,

    overhead/token = (federated s / federated tokens) / (centralized s / centralized tokens),

which is what the engine itself (swaps, aggregation, folding) adds.
"""

from __future__ import annotations

import argparse
import tempfile

from ..config import load_config
from ..engine.run import run_experiment


def measure(config: str | None, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="fedlora-overhead-") as tmp:
        common = list(overrides) + [f"output_dir={tmp}", "progress=false", "fed.eval_every=1000000"]
        # Centralized first: whatever the process warms up (allocator, kernels) favours it, not federated.
        cen = run_experiment(load_config(config, common + ["fed.mode=centralized"]), export=False, plots=False)
        fed = run_experiment(load_config(config, common + ["fed.mode=federated"]), export=False, plots=False)
    fed_s = fed["train_s"] + fed["aggregate_s"] + fed["fold_s"]
    cen_s = cen["train_s"] + cen["aggregate_s"] + cen["fold_s"]
    return {
        "federated_s": fed_s,
        "centralized_s": cen_s,
        "overhead": fed_s / cen_s,
        "overhead_per_token": (fed_s / fed["train_tokens"]) / (cen_s / cen["train_tokens"]),
        "federated_parts": {k: fed[k] for k in ("train_s", "aggregate_s", "fold_s", "train_steps", "train_tokens")},
        "centralized_parts": {k: cen[k] for k in ("train_s", "aggregate_s", "fold_s", "train_steps", "train_tokens")},
    }


def main(args: argparse.Namespace) -> int:
    r = measure(args.config, args.overrides)
    print(
        f"federated  (train {r['federated_parts']['train_s']:.1f} s + aggregate {r['federated_parts']['aggregate_s']:.3f} s + fold {r['federated_parts']['fold_s']:.3f} s) = {r['federated_s']:.1f} s"
    )
    print(f"centralized (train {r['centralized_parts']['train_s']:.1f} s) = {r['centralized_s']:.1f} s")
    f, c = r["federated_parts"], r["centralized_parts"]
    print(
        f"work: federated {f['train_steps']} steps, {f['train_tokens']} padded tokens; "
        f"centralized {c['train_steps']} steps, {c['train_tokens']} padded tokens ({f['train_tokens'] / c['train_tokens']:.3f}×)"
    )
    print(f"overhead = {r['overhead']:.3f}  (target ≤ 1.05)")
    print(f"overhead per padded token = {r['overhead_per_token']:.3f}  (what the engine adds beyond the clients' extra padding)")
    return 0
