#!/usr/bin/env bash
# Do the defaults train a task nobody tuned them on? A "user's task": QNLI's dev set (5,463
# question/sentence pairs; GLUE's QNLI training set is not in ../shared) split into 4,463
# training and 1,000 evaluation rows as CSV files, trained centralized with nothing but the
# data settings given, under the current defaults (train.lr 1e-3; head_lr 0: the classification
# head at lr), with the head at 1e-2, and under the old defaults (train.lr 5e-4). Prints each
# run's accuracy by round.
# Usage: [SEEDS="0 1"] bash benchmarks/user_task_defaults.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=runs/user-task
mkdir -p "$work"
python - "$work" <<'PY'
import csv, random, sys
rows = list(csv.DictReader(open("../shared/data/glue/QNLI/dev.tsv"), delimiter="\t", quoting=csv.QUOTE_NONE))
random.Random(0).shuffle(rows)
for name, part in (("train", rows[1000:]), ("eval", rows[:1000])):
    with open(f"{sys.argv[1]}/{name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "sentence", "label"])
        w.writerows([r["question"], r["sentence"], r["label"]] for r in part)
PY
data="data.task=file data.train_file=$work/train.csv data.eval_file=$work/eval.csv data.text_columns=[question,sentence] data.label_column=label data.label_names=[entailment,not_entailment]"
for seed in ${SEEDS:-0}; do
  fedlora run $data fed.mode=centralized seed=$seed threads=1 progress=false output_dir=$work name=defaults-s$seed
  fedlora run $data fed.mode=centralized seed=$seed threads=1 progress=false output_dir=$work train.head_lr=1e-2 name=lr1e-3-head1e-2-s$seed
  fedlora run $data fed.mode=centralized seed=$seed threads=1 progress=false output_dir=$work train.lr=5e-4 name=old-defaults-s$seed
done
for f in "$work"/*/metrics.jsonl; do
  python -c "import json,sys; print(sys.argv[1].split('/')[-2], [round(json.loads(l)['eval_accuracy'], 3) for l in open(sys.argv[1])])" "$f"
done
