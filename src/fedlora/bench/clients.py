"""``fedlora bench clients``: memory and time per round against the number of clients.

The same data set (``data.max_train_examples``) is split over K clients, K from ``--clients``;
each round samples ``--per-round`` of them and each trains ``--steps`` optimiser steps, so the
work per round is the same whatever K. Each K runs in its own process (evaluation off) and
reports its peak resident memory and the mean wall time of a round (training, aggregation,
folding, bookkeeping, checkpoint). Flat rows mean the engine keeps no per-client state beyond
an index list: one base model serves every simulated client.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--clients", default="10,100,1000", help="comma-separated numbers of clients")
    p.add_argument("--per-round", type=int, default=10, help="clients sampled per round")
    p.add_argument("--steps", type=int, default=2, help="local optimiser steps per client and round")
    p.add_argument("--rounds", type=int, default=5)


def _one(config: str | None, overrides: list[str]) -> dict:
    from ..config import load_config
    from ..engine.run import run_experiment, run_name
    from ._memory import _status_kib

    with tempfile.TemporaryDirectory(prefix="fedlora-clients-") as tmp:
        t0 = time.perf_counter()
        cfg = load_config(config, [*overrides, f"output_dir={tmp}", "progress=false", "fed.eval_every=1000000"])
        run_experiment(cfg, export=False, plots=False)
        wall = time.perf_counter() - t0
        with open(f"{tmp}/{run_name(cfg)}/metrics.jsonl") as f:
            rows = [json.loads(x) for x in f]
    per_round = [r["train_s"] + r["aggregate_s"] + r["fold_s"] for r in rows]
    return {"peak_rss_mib": (_status_kib("VmHWM") or 0) / 1024, "round_s": sum(per_round[1:]) / max(1, len(per_round) - 1), "wall_s": wall}


def main(args: argparse.Namespace) -> int:
    print(f"{args.per_round} clients per round, {args.steps} local steps each, {args.rounds} rounds; the same data set split over K clients")
    print("| clients K | sampled per round | peak memory MiB | s per round (rounds 2..) | ratio to the first row |")
    print("|---|---|---|---|---|")
    first = None
    for k in (int(x) for x in args.clients.split(",")):
        over = [
            *args.overrides,
            f"partition.num_clients={k}",
            f"fed.fraction={args.per_round / k}",
            f"train.steps={args.steps}",
            f"fed.rounds={args.rounds}",
            "partition.scheme=iid",
        ]
        code = "import sys, json; from fedlora.bench.clients import _one; print(json.dumps(_one(sys.argv[1] or None, sys.argv[2:])))"
        done = subprocess.run([sys.executable, "-c", code, args.config or "", *over], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return done.returncode
        r = json.loads(done.stdout.strip().splitlines()[-1])
        first = first or r
        print(f"| {k} | {args.per_round} | {r['peak_rss_mib']:.0f} | {r['round_s']:.3f} | {r['round_s'] / first['round_s']:.2f} |")
    return 0
