#!/usr/bin/env bash
# FedEx-LoRA's Table 3 (RoBERTa-base, r=4, 3 IID clients, 50 rounds × 3 local epochs; the evidence issue's
# "published ordering"): fedex, fedit, ffa and centralized on CoLA, RTE, MRPC, SST-2, QNLI and STS-B, 3 seeds,
# the best dev metric over rounds. Published (methods.md §4.4): FedEx 84.39 average, FedIT 83.42, FFA 82.13,
# centralized 84.31. Needs internet (RoBERTa-base and GLUE from the hub) and a GPU: one SST-2 cell trains on
# 67k × 3 × 50 = 10M examples (hours on one GPU; weeks on a 2-core CPU). Finished cells are read back.
# Usage: [TASKS="cola rte mrpc sst2 qnli stsb"] [SEEDS=0,1,2] bash benchmarks/fedex_table3.sh [overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
for task in ${TASKS:-cola rte mrpc sst2 qnli stsb}; do
  fedlora compare benchmarks/recipes/fedex_table3.yaml data.task="$task" train.head_lr=1e-3 "$@" \
    --methods fedex,fedit,ffa,centralized --partitions iid --seeds "${SEEDS:-0,1,2}" --baseline fedit \
    --out "results/fedex-table3/$task" --title "FedEx-LoRA Table 3: $task, RoBERTa-base, r=4, 3 IID clients"
done
