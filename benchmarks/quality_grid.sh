#!/usr/bin/env bash
# The quality grid of BENCHMARKS.md on one GLUE task: methods (+ centralized) × partitions ×
# seeds, then HEXA's ablation (each part switched off or swapped in turn) under the strongest
# label skew. JOBS worker processes of one thread each (2 cores → JOBS=2). Finished cells are
# reused and interrupted ones resume, so the script can be stopped and started again.
# Usage: [PARTS=..] [SEEDS=..] [METHODS=..] [ABLATION=0] bash benchmarks/quality_grid.sh [task] [overrides...]
# (long: run it with nohup)
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:-sst2}; shift || true
parts=${PARTS:-"dirichlet:0.1,dirichlet:1.0,iid"}
seeds=${SEEDS:-"0,1,2"}
methods=${METHODS:-"hexa,fedex,fedit,ffa,fra,flora,flexlora,hetlora,fedhl,centralized"}
ablation="hexa,hexa[drift_beta=0],hexa[fold_residual=false],hexa[class_aware_head=true],hexa[restart=svd_sqrt],hexa[restart=lstsq],hexa[restart=svd_a_scale],fedex,fedit"
cfg=benchmarks/quality.yaml
common=(data.task="$task" threads=1 "$@")
grid() { fedlora compare "$cfg" "${common[@]}" --seeds "$seeds" --jobs "${JOBS:-2}" "$@"; }

grid --methods "$methods" --partitions "$parts" --out "results/quality-$task" \
  --title "Quality: MiniLM-L6 on $task, 10 clients"
if [ "${ABLATION:-1}" = 1 ]; then
  grid --methods "$ablation" --partitions dirichlet:0.1 --out "results/ablation-$task" \
    --title "HEXA ablation: MiniLM-L6 on $task, Dirichlet(0.1), 10 clients"
fi
