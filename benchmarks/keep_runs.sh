#!/usr/bin/env bash
# Stage the finished grid runs under results/runs/ for a commit, so a grid that runs in pieces (across
# sessions, machines or clones) resumes from them: `fedlora compare` reads a finished cell back from its
# folder's summary.json, config.yaml and metrics.jsonl (.gitignore keeps those three and nothing else;
# unfinished folders, checkpoints and adapters stay out).
# Usage: bash benchmarks/keep_runs.sh   (then git commit)
set -euo pipefail
cd "$(dirname "$0")/.."
n=0
while IFS= read -r -d '' summary; do
  run=$(dirname "$summary")
  git add -- "$run/summary.json" "$run/config.yaml" "$run/metrics.jsonl"
  n=$((n + 1))
done < <(find results/runs -name summary.json -print0 2>/dev/null)
echo "$n finished runs staged under results/runs"
