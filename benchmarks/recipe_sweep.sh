#!/usr/bin/env bash
# Task recipes: centralized MiniLM-L6 per (learning rate, head learning rate), evaluated every
# round on examples held out of the *training* set (data.eval_split=holdout): dev is never seen
# while choosing. The chosen pair goes into benchmarks/recipes/<task>.yaml, which every method of
# the evidence grids then uses. Finished runs are read back, so the sweep resumes.
# Usage: [LRS="3e-4 1e-3 3e-3"] [HEAD_LRS="1e-2"] [THREADS=2] [TAG=name] bash benchmarks/recipe_sweep.sh TASK [overrides...]
# TAG names a variant of the recipe (the overrides): its runs go to results/recipes/TASK-TAG.
set -euo pipefail
cd "$(dirname "$0")/.."
task=$1; shift
out=results/recipes/$task${TAG:+-$TAG}
for lr in ${LRS:-3e-4 1e-3 3e-3}; do
  for hl in ${HEAD_LRS:-1e-2}; do
    name="$task-lr$lr-head$hl"
    args=("benchmarks/recipes/$task.yaml" fed.mode=centralized data.eval_split=holdout
      train.lr="$lr" train.head_lr="$hl" threads="${THREADS:-2}" output_dir="$out" name="$name" "$@")
    # A finished run (its summary.json; git keeps no checkpoint, so `fedlora run` would train it
    # again) is read back, if it ran with these settings; with others, stop: give them another TAG.
    if [[ -f $out/$name/summary.json ]]; then
      python - "$out/$name" "${args[@]}" <<'PY'
import sys
from pathlib import Path

import yaml

from fedlora.config import load_config
from fedlora.engine.server import first_difference

run = Path(sys.argv[1])
key = first_difference(yaml.safe_load((run / "config.yaml").read_text()), load_config(sys.argv[2], sys.argv[3:]))
if key is not None:
    sys.exit(f"{run} finished with another {key}: give these overrides another TAG")
PY
      echo "$name: finished, read back" >&2
      continue
    fi
    fedlora run "${args[@]}"
  done
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
rows = []
for s in sorted(Path(sys.argv[1]).glob("*/summary.json")):
    r = json.loads(s.read_text())
    m = r["primary_metric"]
    curve = [json.loads(x).get("eval_" + m) for x in (s.parent / "metrics.jsonl").read_text().splitlines()]
    rows.append((s.parent.name, r["best"][m], r["best_round"], r["final"][m], " ".join(f"{v:.3f}" for v in curve if v is not None), r["train_s"]))
print(f"| run | best {m} (held out) | best round | final | every round | training s |\n|---|---|---|---|---|---|")
for name, best, rnd, final, curve, s in sorted(rows, key=lambda r: -r[1]):
    print(f"| {name} | {best:.4f} | {rnd} | {final:.4f} | {curve} | {s:.0f} |")
PY
