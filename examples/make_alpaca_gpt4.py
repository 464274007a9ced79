"""alpaca-gpt4 (FlowerTune's general-NLP data set) as fedlora instruction files:

    python examples/make_alpaca_gpt4.py     # writes examples/data/alpaca_gpt4_{train,eval}.jsonl

Each line: {"instruction", "input", "output"}. Downloads ``flwrlabs/alpaca-gpt4`` from the
Hugging Face hub (internet needed). The last ``--eval`` rows (after a seeded shuffle) are held out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="flwrlabs/alpaca-gpt4")
    parser.add_argument("--eval", type=int, default=1000, help="rows held out for evaluation")
    parser.add_argument("--out", type=Path, default=HERE / "data")
    args = parser.parse_args()

    from datasets import load_dataset

    rows = load_dataset(args.dataset, split="train").shuffle(seed=0)
    args.out.mkdir(parents=True, exist_ok=True)
    splits = {"train": range(len(rows) - args.eval), "eval": range(len(rows) - args.eval, len(rows))}
    for split, idx in splits.items():
        path = args.out / f"alpaca_gpt4_{split}.jsonl"
        with path.open("w") as f:
            for i in idx:
                r = rows[i]
                f.write(json.dumps({"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]}) + "\n")
        print(f"{path}: {len(idx)} examples")


if __name__ == "__main__":
    main()
