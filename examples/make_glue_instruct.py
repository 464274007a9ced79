"""Instruction data from the local GLUE copy, one category per task (FLAN-style templates),
for federated instruction tuning of a causal LM where clients differ in what they are asked:

    python examples/make_glue_instruct.py            # writes examples/data/glue_instruct_{train,eval}.jsonl

Each line: {"instruction", "input", "output", "category"}. Tasks: SST-2 (sentiment), RTE and
QNLI (entailment; from halves of its dev set when the copy lacks train.tsv), STS-B (similarity, answered as a number 0-5). Deterministic (seeded).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

TEMPLATES = {
    "sst2": ("Is the sentiment of this movie review positive or negative?", lambda r: r["sentence"], lambda r: ["negative", "positive"][int(r["label"])]),
    "rte": (
        "Does the first sentence imply the second? Answer yes or no.",
        lambda r: f"{r['sentence1']}\n{r['sentence2']}",
        lambda r: "yes" if r["label"] == "entailment" else "no",
    ),
    "qnli": (
        "Does the sentence answer the question? Answer yes or no.",
        lambda r: f"Question: {r['question']}\nSentence: {r['sentence']}",
        lambda r: "yes" if r["label"] == "entailment" else "no",
    ),
    "stsb": (
        "How similar are the two sentences, from 0 (unrelated) to 5 (same meaning)? Answer with one number.",
        lambda r: f"{r['sentence1']}\n{r['sentence2']}",
        lambda r: f"{float(r['score']):.1f}",
    ),
}
FOLDERS = {"sst2": "SST-2", "rte": "RTE", "qnli": "QNLI", "stsb": "STS-B"}


def read_tsv(path: Path) -> list[dict[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    if path.parent.name == "STS-B":  # its TSV has many columns; the last three are sentence1, sentence2, score
        return [dict(zip(["sentence1", "sentence2", "score"], line.split("\t")[-3:])) for line in lines[1:]]
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line.count("\t") == len(header) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--glue", default=str(HERE.parent.parent / "shared" / "data" / "glue"), help="GLUE folder (download_glue_data.py layout)")
    ap.add_argument("--out", default=str(HERE / "data"))
    ap.add_argument("--train-per-task", type=int, default=500)
    ap.add_argument("--eval-per-task", type=int, default=50)
    args = ap.parse_args()
    rng = random.Random(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train_per_task), ("eval", args.eval_per_task)):
        rows = []
        for task, (instruction, inp, answer) in TEMPLATES.items():
            folder = Path(args.glue) / FOLDERS[task]
            if (folder / "train.tsv").is_file():
                source = read_tsv(folder / ("train.tsv" if split == "train" else "dev.tsv"))
            else:  # a copy without train.tsv (QNLI here): its dev set, halved, serves both splits
                dev = read_tsv(folder / "dev.tsv")
                source = dev[: len(dev) // 2] if split == "train" else dev[len(dev) // 2 :]
            for r in rng.sample(source, min(n, len(source))):
                rows.append({"instruction": instruction, "input": inp(r), "output": answer(r), "category": task})
        rng.shuffle(rows)
        path = out / f"glue_instruct_{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} examples")


if __name__ == "__main__":
    main()
