#!/usr/bin/env bash
# SmolLM2-135M federated instruction tuning: held-out loss per method against centralized training
# at the same budget (examples/smollm2_instruct.yaml with 400 examples and 3 rounds), seed 0.
# Resumable: a finished run is read back, an interrupted one resumes. About 5 minutes per run on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results/smollm2/methods}
common=(data.max_train_examples=400 fed.rounds=3 progress=false output_dir="$out")
[ -f examples/data/glue_instruct_train.jsonl ] || python examples/make_glue_instruct.py
for m in ${METHODS:-fedit fedex hexa fra flexlora}; do
  fedlora run examples/smollm2_instruct.yaml fed.method="$m" name="smollm2-$m" "${common[@]}"
done
fedlora run examples/smollm2_instruct.yaml fed.mode=centralized name=smollm2-centralized "${common[@]}"
python - "$out" <<'PY'
import json, sys
from pathlib import Path
rows = []
for run in sorted(Path(sys.argv[1]).glob("smollm2-*/metrics.jsonl")):
    last = [json.loads(x) for x in run.read_text().splitlines()][-1]
    rows.append((run.parent.name.removeprefix("smollm2-"), last["eval_loss"], last["eval_perplexity"], sum(json.loads(x)["train_s"] for x in run.read_text().splitlines())))
print("| run | held-out loss | perplexity | client training s |\n|---|---|---|---|")
for name, loss, ppl, s in sorted(rows, key=lambda r: r[1]):
    print(f"| {name} | {loss:.4f} | {ppl:.3f} | {s:.0f} |")
PY
