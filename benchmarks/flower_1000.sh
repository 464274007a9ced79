#!/usr/bin/env bash
# Flower's Simulation Engine with many virtual SuperNodes (default 1,000) and 10 sampled per
# round, through README's own `flwr run . local` path, on a copy of this checkout (so the
# developer's ~/.flwr and runs/ are untouched). Prints the run's per-round lines, its wall
# time and the peak memory of the machine's Flower processes.
# Usage: [NODES=1000] [ROUNDS=3] [MODEL=minilm] bash benchmarks/flower_1000.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
nodes=${NODES:-1000}; rounds=${ROUNDS:-3}; model=${MODEL:-minilm}
work=$(mktemp -d)
trap 'kill "${sampler:-}" 2>/dev/null || true; pkill -f "flower-superlink .*$work/flwr-home/local-superlink" || true; rm -rf "$work"' EXIT
mkdir -p "$work/fedlora"
cp -r "$root/src" "$root/pyproject.toml" "$root/README.md" "$work/fedlora/"
ln -s "$root/../shared" "$work/shared"
cd "$work/fedlora"
export FLWR_HOME="$work/flwr-home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
fraction=$(python -c "print(10 / $nodes)")
# Peak resident memory of every process of this run (the SuperLink, the simulation and its
# workers all carry this FLWR_HOME), sampled twice a second.
python - "$FLWR_HOME" > "$work/memory.txt" <<'PY' &
import os, sys, time
tag = f"FLWR_HOME={sys.argv[1]}".encode()
peak, peak_by = 0, {}
try:
    while True:
        total, by = 0, {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if pid == str(os.getpid()):
                continue
            try:
                if tag not in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
                    continue
                name = open(f"/proc/{pid}/comm").read().strip()
                rss = next(int(x.split()[1]) for x in open(f"/proc/{pid}/status") if x.startswith("VmRSS"))
            except (OSError, StopIteration):
                continue
            total += rss
            by[name] = by.get(name, 0) + rss
        if total > peak:
            peak, peak_by = total, by
            print(f"peak RSS {peak / 1024:.0f} MiB: " + ", ".join(f"{k} {v / 1024:.0f}" for k, v in sorted(peak_by.items(), key=lambda kv: -kv[1])), flush=True)
        time.sleep(0.5)
except KeyboardInterrupt:
    pass
PY
sampler=$!
start=$(date +%s)
flwr run . local --stream --federation-config "num-supernodes=$nodes" \
  --run-config "fed.method='fedex' fed.rounds=$rounds fed.fraction=$fraction partition.num_clients=$nodes partition.scheme='iid' model.name='$model' data.max_train_examples=20000 data.max_eval_examples=200 train.steps=2 train.batch_size=16 data.data_dir='$work/shared/data/glue' output_dir='$work/runs' name='flower-$nodes'" \
  2>&1 | grep -E "fedlora: (round|roll|error)|finished" || true
echo "wall time: $(( $(date +%s) - start )) s for $nodes virtual SuperNodes, $rounds rounds, 10 clients per round"
kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
tail -n 1 "$work/memory.txt"
test -f "$work/runs/flower-$nodes/summary.json" && python -c "import json,sys; print(json.load(open(sys.argv[1]))['final'])" "$work/runs/flower-$nodes/summary.json"
