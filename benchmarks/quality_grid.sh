#!/usr/bin/env bash
# The quality grid of BENCHMARKS.md: every method (+ centralized) × partitions × 3 seeds on
# one GLUE task, then HEXA's ablation. Two worker processes of one thread each (2 cores).
# Usage: bash benchmarks/quality_grid.sh [task] [extra overrides...]   (long: run with nohup)
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:-sst2}; shift || true
parts=${PARTS:-"iid,dirichlet:0.1"}
seeds="0,1,2"
cfg=benchmarks/quality.yaml
common=(data.task="$task" "$@")
half_a="hexa,fedex,fedit,ffa,fra"
half_b="flora,flexlora,hetlora,fedhl,centralized"
ablation="hexa[drift_beta=0],hexa[restart=svd_sqrt],hexa[restart=svd_a_scale],hexa[restart=lstsq],hexa[fold_residual=false],hexa[class_aware_head=true]"

fedlora compare "$cfg" "${common[@]}" --methods "$half_a" --partitions "$parts" --seeds "$seeds" --out "results/quality-$task/a" &
fedlora compare "$cfg" "${common[@]}" --methods "$half_b" --partitions "$parts" --seeds "$seeds" --out "results/quality-$task/b" &
wait
fedlora compare "$cfg" "${common[@]}" --methods "$half_a,$half_b" --partitions "$parts" --seeds "$seeds" \
  --collect-only --out "results/quality-$task" --title "Quality: MiniLM-L6 on $task, 10 clients"

abl_parts="dirichlet:0.1"
fedlora compare "$cfg" "${common[@]}" --methods "hexa[drift_beta=0],hexa[restart=svd_sqrt],hexa[restart=svd_a_scale]" --partitions "$abl_parts" --seeds "$seeds" --out "results/ablation-$task/a" &
fedlora compare "$cfg" "${common[@]}" --methods "hexa[restart=lstsq],hexa[fold_residual=false],hexa[class_aware_head=true]" --partitions "$abl_parts" --seeds "$seeds" --out "results/ablation-$task/b" &
wait
fedlora compare "$cfg" "${common[@]}" --methods "hexa,$ablation,fedex,fedit" --partitions "$abl_parts" --seeds "$seeds" \
  --collect-only --out "results/ablation-$task" --title "HEXA ablation: MiniLM-L6 on $task, 10 clients"
