"""Threshold or representation? For every finished cell of a grid whose run folders still hold their
exported adapter/ (git keeps only summary, config and metrics: this runs where the grid ran), the
global model's dev logits: accuracy at the model's own threshold, ROC AUC of the logit difference
(threshold-free), the share of dev sentences predicted positive, and the accuracy of the best
threshold on that difference (an oracle chosen on dev: a ceiling, not a fair score).

    python benchmarks/dp_threshold.py results/runs/dp-local-full > results/dp/local-full/threshold.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from sklearn.metrics import roc_auc_score

from fedlora.config import load_config
from fedlora.engine import build_experiment
from fedlora.engine.evaluate import predict
from fedlora.models.export import quiet_peft
from fedlora.models.hub import load_base


def main(root: Path) -> None:
    torch.set_num_threads(1)
    exp = cfg = None
    for run in sorted(root.iterdir()):
        if not (run / "summary.json").is_file() or not (run / "adapter").is_dir():
            continue
        if exp is None:  # the dev set and tokenizer of the grid (a small training subset: only dev is scored)
            cfg = load_config(run / "config.yaml", ["data.max_train_examples=600", "privacy.mode=none", "privacy.target_epsilon=0", "partition.scheme=iid"])
            exp = build_experiment(cfg)
        assert cfg is not None
        base = load_base(cfg.model.name, exp.task.num_labels, exp.task.is_regression, exp.causal, cfg.model.pair_encoder)
        with quiet_peft():
            model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
        with torch.no_grad():
            logits, labels = predict(model, exp.eval, np.arange(len(exp.eval.labels)), 128, exp.pad_token_id)
        d = logits[:, 1] - logits[:, 0]
        oracle = max(float(((d > t) == labels).mean()) for t in np.concatenate([[-np.inf], np.sort(d)]))
        summary = json.loads((run / "summary.json").read_text())
        row = {
            "run": run.name,
            "accuracy": float(((d > 0) == labels).mean()),
            "summary_accuracy": summary["final"]["accuracy"],  # the same model as the run scored it: a check
            "auc": float(roc_auc_score(labels, d)),
            "predicted_positive": float((d > 0).mean()),
            "dev_positive": float(labels.mean()),
            "best_threshold_accuracy": oracle,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
