#!/usr/bin/env bash
# The quality grid of BENCHMARKS.md on one GLUE task: every method (+ centralized) × partitions
# × seeds, then HEXA's ablation (each part switched off or swapped in turn) under the strongest
# label skew. Two worker processes of one thread each (2 cores). Finished cells are reused and
# interrupted ones resume, so the script can be stopped and started again.
# Usage: bash benchmarks/quality_grid.sh [task] [extra overrides...]   (long: run with nohup)
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:-sst2}; shift || true
parts=${PARTS:-"dirichlet:0.1,iid"}
seeds=${SEEDS:-"0,1,2"}
cfg=benchmarks/quality.yaml
common=(data.task="$task" "$@")
run() { fedlora compare "$cfg" "${common[@]}" --seeds "$seeds" "$@"; }

# Main grid: the heterogeneous column first.
for p in ${parts//,/ }; do
  run --methods "hexa,fedex,fedit,ffa,fra" --partitions "$p" --out "results/quality-$task/a" &
  run --methods "flora,flexlora,hetlora,fedhl,centralized" --partitions "$p" --out "results/quality-$task/b" &
  wait
done
run --methods "hexa,fedex,fedit,ffa,fra,flora,flexlora,hetlora,fedhl,centralized" --partitions "$parts" \
  --collect-only --out "results/quality-$task" --title "Quality: MiniLM-L6 on $task, 10 clients"

# HEXA ablation under Dirichlet(0.1) label skew.
run --methods "hexa[drift_beta=0],hexa[class_aware_head=true],hexa[restart=svd_sqrt]" --partitions dirichlet:0.1 --out "results/ablation-$task/a" &
run --methods "hexa[fold_residual=false],hexa[restart=lstsq],hexa[restart=svd_a_scale]" --partitions dirichlet:0.1 --out "results/ablation-$task/b" &
wait
run --methods "hexa,hexa[drift_beta=0],hexa[class_aware_head=true],hexa[fold_residual=false],hexa[restart=svd_sqrt],hexa[restart=lstsq],hexa[restart=svd_a_scale],fedex,fedit" \
  --partitions dirichlet:0.1 --collect-only --out "results/ablation-$task" --title "HEXA ablation: MiniLM-L6 on $task, Dirichlet(0.1), 10 clients"
