#!/usr/bin/env bash
# The evidence grids (BENCHMARKS.md "Evidence"): every method at its task recipe's budget
# (benchmarks/recipes/<task>.yaml), seeds paired (a seed fixes the partition, the training
# subset and every client's batches), reported as means with 95% intervals and differences
# from fedit paired by seed. Finished cells are read back and interrupted ones resume, so each
# part can run in pieces. JOBS worker processes of one thread each (2 cores → JOBS=2).
#
# Usage: [SEEDS=0,1,2,3,4] [PARTITIONS=iid,dirichlet:1.0,dirichlet:0.1] [ONLY=hexa,fedex,…] [JOBS=2] [SST2_RECIPE=sst2] [STATUS=1] [PARTIAL=1] [SHARD=K/N] bash benchmarks/evidence_grid.sh PART
# ONLY runs the part's cells of these methods alone (e.g. the Dirichlet(0.1) cells HEXA's question needs first); a
# later call without it runs the rest and writes the whole table.
# STATUS=1 runs nothing: it lists the part's runs (finished, stopped after k rounds, not started) and the compute left.
# PARTIAL=1 runs nothing either: it writes the part's tables from the cells finished so far (n seeds per cell).
# SHARD=K/N splits a part over N machines: each runs (or, with STATUS=1, lists) only share K's runs and writes no
# tables; copy every machine's results/runs/* into one checkout, then PARTIAL=1 (or a plain call) writes them.
# SST2_RECIPE picks the SST-2 parts' recipe under benchmarks/recipes/ (sst2-8k: the first, 8,000-example
# budget, whose grids are in results/evidence/sst2-8k); another recipe's tables go to results/evidence/<recipe>.
# (SEEDS=0 then SEEDS=1 … fills whole seeds first when a part runs in pieces; a last call with
# every seed writes the full table from the finished cells.)
#   lr        each method's learning rate at SST-2 Dirichlet(0.1), seed 0 (FFA-LoRA trains only B), on dev
#   lr-holdout  the two best of each again, and the head at the adapters' rate (the recipe's head_lr
#               1e-2 was chosen centralized), on examples held out of the training set (the choice)
#   momentum-holdout  HEXA's server momentum (μ = 0.5) at the chosen rate and at 3e-4, seed 0, held out (as lr-holdout)
#   sst2      SST-2 × {iid, Dirichlet 1.0, Dirichlet 0.1} × the nine methods and centralized
#   centralized  the centralized cells only (TASK=sst2 by default, or stsb, rte, rte-siamese): one run per seed serves every partition
#   stsb      STS-B × {iid, Dirichlet 0.1} × hexa, fedex, fedit, flexlora, fedhl, centralized
#   rte       RTE, the same, as a bi-encoder (recipes/rte-siamese.yaml)
#   ranks     SST-2 with client ranks 2/4/8/16 (FedHL's setting): hexa, fedhl, flexlora, hetlora, flora
#   quantity  SST-2 with quantity skew (Dirichlet 0.5 over sizes): the nine methods
#   ablation  HEXA's ablation at SST-2 Dirichlet(0.1)
#   newer     the methods the field moved to (FedSVD, RoLoRA, Fed-SB, FedSA-LoRA) beside fedex and fedit, same
#             budget; FedSA-LoRA's clients hold 10% of their data out to score their own models (the report's
#             "Personalised models" table; its global-model cells mean little)
# Compute per run (2 cores, bf16): see the "Compute per run" table each part writes.
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: bash benchmarks/evidence_grid.sh lr|lr-holdout|momentum-holdout|sst2|centralized|stsb|rte|ranks|quantity|ablation|newer}
seeds=${SEEDS:-0,1,2,3,4}
recipe=${SST2_RECIPE:-sst2}
# Federated learning rates from the lr-holdout part (SST-2, Dirichlet(0.1), seed 0, mean held-out accuracy of rounds
# 6–10; BENCHMARKS.md "Evidence grids: the learning rates"). The methods whose clients train A and B as FedIT's do take
# FedIT's rate ($lr), those that train B only (FFA-LoRA, FedSVD) FFA-LoRA's ($lr_b); the head stays at the recipe's 1e-2;
# centralized keeps the recipe's own.
if [[ $recipe == sst2-8k ]]; then
  # 8,000 examples on query/value: fedit 3e-3 (77.6%) over 1e-2 (73.3%); ffa 1e-2 (75.1%) over 3e-3 (68.9%); hexa
  # 3e-3 (81.4%) over 1e-3 (76.3%); the head at the adapters' rate did not help fedit (75.9%).
  lr="train.lr=3e-3" lr_b="train.lr=1e-2"
else
  # 24,000 examples on every linear layer (75 local steps a round): fedit 1e-3 (80.4%) over 3e-4 (78.2%), 3e-3
  # diverged (50.7%: the global model flips between the two classes); ffa 1e-3 (78.4%) over 3e-3 (75.8%) and
  # 3e-4 (72.6%), 1e-2 diverged; hexa 1e-3 (82.8%) over 3e-4 (81.9%).
  lr="train.lr=1e-3" lr_b="train.lr=1e-3"
fi
nine="hexa[$lr],fedex[$lr],fedit[$lr],ffa[$lr_b],fra[$lr],flora[$lr],flexlora[$lr],hetlora[$lr],fedhl[$lr]"
root=results/evidence${SST2_RECIPE:+/$SST2_RECIPE}  # the SST-2 parts' tables
only() {  # only SPECS: the comma-separated method specs whose method is in $ONLY (every spec when ONLY is unset)
  python3 -c 'import re, sys
specs = re.findall(r"[^,\[]+(?:\[[^\]]*\])?", sys.argv[1])  # commas inside [...] belong to a spec
keep = [s for s in specs if not sys.argv[2] or s.split("[")[0] in sys.argv[2].split(",")]
print(",".join(keep)) if keep else sys.exit("ONLY=" + sys.argv[2] + " names none of " + sys.argv[1])' "$1" "${ONLY:-}"
}
grid() {  # grid TASK [overrides…] [--options…]: overrides must come before fedlora compare's options
  local task=$1 over=() opts=()
  shift
  while [[ $# -gt 0 && $1 != --* ]]; do over+=("$1"); shift; done
  [[ $task == sst2 ]] && task=$recipe
  local kept="" modes=()
  while [[ $# -gt 0 ]]; do
    if [[ $1 == --methods ]]; then
      kept=$(only "$2") || exit 2
      opts+=("$1" "$kept"); shift 2
    elif [[ $1 == --baseline && -n ${ONLY:-} && ,$kept, != *",$2,"* ]]; then
      # ONLY left the baseline out: the first kept method is the table's baseline (a spec's options may hold commas)
      opts+=("$1" "$(python3 -c 'import re, sys; print(re.findall(r"[^,\[]+(?:\[[^\]]*\])?", sys.argv[1])[0])' "$kept")"); shift 2
    else
      opts+=("$1"); shift
    fi
  done
  [[ ${STATUS:-0} != 0 ]] && modes+=(--status)
  [[ ${PARTIAL:-0} != 0 ]] && modes+=(--partial)
  [[ -n ${SHARD:-} ]] && modes+=(--shard "$SHARD")
  fedlora compare "benchmarks/recipes/$task.yaml" threads=1 "${over[@]}" --jobs "${JOBS:-2}" "${opts[@]}" "${modes[@]}"
}
case $part in
  lr)
    grid sst2 --methods "fedit[train.lr=3e-4],fedit,fedit[train.lr=3e-3],fedit[train.lr=1e-2],ffa[train.lr=1e-3],ffa[train.lr=3e-3],ffa[train.lr=1e-2],ffa[train.lr=3e-2],hexa[train.lr=3e-4],hexa,hexa[train.lr=3e-3],hexa[train.lr=1e-2]" \
      --partitions dirichlet:0.1 --seeds 0 --baseline fedit --out $root/lr --title "Learning rate per method: SST-2, Dirichlet(0.1), seed 0" ;;
  lr-holdout)  # the two best rates of each at seed 0, judged on 1,000 training examples held out (not dev)
    if [[ $recipe == sst2-8k ]]; then  # the 8k recipe's check also tried the head at the adapters' rate (no help)
      rates="fedit[train.lr=3e-3],fedit[train.lr=1e-2],fedit[train.lr=3e-3,train.head_lr=3e-3],ffa[train.lr=3e-3],ffa[train.lr=1e-2],ffa[train.lr=1e-2,train.head_lr=1e-2],hexa,hexa[train.lr=3e-3],hexa[train.lr=3e-3,train.head_lr=3e-3]"
    else  # a larger budget takes more local steps per round: the rates chosen at 8k and lower ones (3e-3 diverged
          # for fedit at 24k, so each method's range reaches down until its best rate is not at the range's edge)
      rates="fedit[train.lr=1e-3],fedit[train.lr=3e-3],hexa[train.lr=1e-3],ffa[train.lr=3e-3],fedit[train.lr=3e-4],ffa[train.lr=1e-3],ffa[train.lr=1e-2],hexa[train.lr=3e-4],ffa[train.lr=3e-4]"
    fi
    grid sst2 data.eval_split=holdout output_dir=results/runs/evidence-holdout${SST2_RECIPE:+-$SST2_RECIPE} --methods "$rates" \
      --partitions dirichlet:0.1 --seeds 0 --baseline "fedit[train.lr=3e-3]" --out $root/lr-holdout --title "Learning rate per method on held-out training data: SST-2, Dirichlet(0.1), seed 0" ;;
  momentum-holdout)  # HEXA's server momentum (docs/hexa.md, candidate 4) before its ablation row: does μ = 0.5 train at
                     # the chosen rate, or does the doubled step want a lower one? Seed 0, held-out sentences, as lr-holdout
    grid sst2 data.eval_split=holdout output_dir=results/runs/evidence-holdout${SST2_RECIPE:+-$SST2_RECIPE} \
      --methods "hexa[$lr],hexa[server_momentum=0.5,$lr],hexa[server_momentum=0.5,train.lr=3e-4]" --partitions dirichlet:0.1 --seeds 0 \
      --baseline "hexa[$lr]" --out $root/momentum-holdout --title "HEXA with server momentum on held-out training data: SST-2, Dirichlet(0.1), seed 0" ;;
  sst2)
    grid sst2 --methods "$nine,centralized" --partitions "${PARTITIONS:-iid,dirichlet:1.0,dirichlet:0.1}" --seeds "$seeds" \
      --baseline "fedit[$lr]" --out $root/sst2 --title "SST-2, MiniLM-L6, 10 clients, recipe budget" ;;
  centralized)  # the task part's centralized cells alone (one run per seed serves every partition)
    task=${TASK:-sst2}
    # its own table folder: the task's full part writes results/evidence/<task>
    grid "$task" --methods centralized --partitions iid --seeds "$seeds" --baseline centralized --out "$( [[ $task == sst2 ]] && echo $root || echo results/evidence )/$task-centralized" --title "$task, MiniLM-L6, centralized" ;;
  stsb|rte)  # RTE as a bi-encoder: its recipe beat the cross-encoder's on held-out pairs (BENCHMARKS.md "The bi-encoder recipe")
    recipe_file=$part; [[ $part == rte ]] && recipe_file=rte-siamese
    grid "$recipe_file" --methods "hexa,fedex,fedit,flexlora,fedhl,centralized" --partitions "iid,dirichlet:0.1" --seeds "$seeds" \
      --baseline fedit --out "results/evidence/$recipe_file" --title "$recipe_file, MiniLM-L6, 10 clients, recipe budget" ;;
  ranks)
    # its own run folders: the cells' names do not say the ranks, and the sst2 part's cells of these methods share them
    grid sst2 model.client_ranks="[2,4,8,16]" model.rank=16 output_dir=results/runs/evidence-ranks${SST2_RECIPE:+-$SST2_RECIPE} --methods "hexa[$lr],fedhl[$lr],flexlora[$lr],hetlora[$lr],flora[$lr]" --partitions "iid,dirichlet:0.1" \
      --seeds "$seeds" --baseline "flexlora[$lr]" --out $root/ranks --title "SST-2, client ranks 2/4/8/16" ;;
  quantity)
    grid sst2 --methods "$nine" --partitions "quantity:0.5" --seeds "$seeds" --baseline "fedit[$lr]" --out $root/quantity --title "SST-2, quantity skew" ;;
  ablation)
    grid sst2 --methods "hexa[$lr],hexa[drift_beta=0,$lr],hexa[fold_residual=false,$lr],hexa[class_aware_head=true,$lr],hexa[restart=svd_sqrt,$lr],hexa[restart=lstsq,$lr],hexa[drift_beta=3,$lr],hexa[server_momentum=0.5,$lr],fedex[$lr],fedit[$lr]" \
      --partitions dirichlet:0.1 --seeds "$seeds" --baseline "hexa[$lr]" --out $root/ablation --title "HEXA ablation, SST-2, Dirichlet(0.1)" ;;
  newer)
    grid sst2 --methods "fedsvd[$lr_b],rolora[$lr],fedsb[$lr],fedsa[fed.personal_eval=0.1,$lr],fedex[$lr],fedit[$lr]" --partitions "iid,dirichlet:0.1" --seeds "$seeds" \
      --baseline "fedit[$lr]" --out $root/newer --title "SST-2: FedSVD, RoLoRA, Fed-SB, FedSA-LoRA beside FedEx and FedIT" ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
