"""Does per-example clipping tilt a label-skewed client's update toward its majority class?

DP-SGD's update is the sum of per-example gradients g_i, each clipped to norm C:
Σ_i g_i · min(1, C / ‖g_i‖). Without clipping an example weighs ‖g_i‖, so well-fit examples
(small loss, small gradient) weigh little; clipped at a C below most norms, every example weighs
about C, however well it is fit. On a client whose examples are mostly of one class, which the
model soon fits, clipping then hands that class back the weight fitting had taken from it.

For each finished run folder named (it must hold its exported adapter/ and checkpoint: this runs
where the grid ran), the run's global model and partition are rebuilt, and on a sample of each
client's training examples (eval mode: no dropout) the per-example gradients of everything the
clients train (LoRA factors and head) are taken one example at a time. Per client it reports:

* ``clipped``: the share of examples with ‖g_i‖ > C;
* ``norm_majority`` / ``norm_minority``: median ‖g_i‖ of the client's majority and minority class;
* ``mass_majority``: the majority class's share of Σ_i w_i, with w_i = ‖g_i‖ unclipped and
  w_i = min(‖g_i‖, C) clipped (``…_clipped``); ``share_majority``: its share of the examples;
* ``bias_push``: the cosine between the update −Σ_i w_i g_i/‖g_i‖ and the direction that raises
  b_majority − b_minority (the head's bias difference): how much of the step moves the threshold
  toward the majority class, unclipped and clipped.

    python benchmarks/dp_clip_skew.py results/runs/dp-local-full/compare-sst2-fedit-dirichlet_0.5-s1 … > results/dp/local-full/clip_skew.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel

from fedlora.config import load_config
from fedlora.data.tokenize import collate
from fedlora.engine import build_experiment
from fedlora.models.export import quiet_peft
from fedlora.models.hub import load_base


def per_example_gradients(model, data, indices, pad_token_id: int, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """One row per example: the gradient of its loss with respect to ``params``, flattened."""
    rows = []
    for i in indices:
        batch = collate(data, [int(i)], pad_token_id)
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]).double())
    return torch.stack(rows)


def client_stats(g: torch.Tensor, labels: np.ndarray, majority: int, clip: float, bias_slice: slice) -> dict:
    norms = g.norm(dim=1)
    major = torch.as_tensor(labels == majority)
    out: dict = {
        "examples": len(labels),
        "share_majority": float(major.double().mean()),
        "clipped": float((norms > clip).double().mean()),
        "norm_majority": float(norms[major].quantile(0.5)) if major.any() else None,
        "norm_minority": float(norms[~major].quantile(0.5)) if (~major).any() else None,
    }
    for name, w in (("", norms), ("_clipped", norms.clamp(max=clip))):
        out["mass_majority" + name] = float(w[major].sum() / w.sum())
        step = -(g * (w / norms.clamp(min=1e-30)).unsqueeze(1)).sum(0)
        b = step[bias_slice]
        # the cosine between the step and (e_majority − e_minority)/√2 on the head's bias: in [−1, 1]
        out["bias_push" + name] = float((b[majority] - b[1 - majority]) / (2**0.5 * step.norm()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--examples", type=int, default=256, help="sampled per client")
    args = ap.parse_args()
    torch.set_num_threads(1)
    built: dict[str, object] = {}
    for run in args.runs:
        cfg = load_config(run / "config.yaml", ["privacy.mode=none", "privacy.target_epsilon=0"])
        key = f"{cfg.seed}/{cfg.partition.scheme}/{cfg.partition.alpha}/{cfg.data.max_train_examples}"
        if key not in built:  # one partition per seed: the grid's methods share it
            built[key] = build_experiment(cfg)
        exp = built[key]
        base = load_base(cfg.model.name, exp.task.num_labels, exp.task.is_regression, exp.causal, cfg.model.pair_encoder)
        with quiet_peft():
            model = PeftModel.from_pretrained(base, str(run / "adapter"), is_trainable=True).eval()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        offset, bias_slice = 0, None
        for n, p in named:  # the head's bias: where its two entries sit in the flattened gradient
            if n.endswith("classifier.modules_to_save.default.bias") or (bias_slice is None and n.endswith("classifier.bias")):
                bias_slice = slice(offset, offset + p.numel())
            offset += p.numel()
        assert bias_slice is not None, "no classifier bias among the trained parameters"
        rng = np.random.default_rng(0)
        for c in exp.clients:
            labels_all = exp.train.labels[c.indices].numpy() if hasattr(exp.train.labels, "numpy") else np.asarray(exp.train.labels)[c.indices]
            majority = int(np.bincount(labels_all, minlength=2).argmax())
            pick = rng.choice(len(c.indices), size=min(args.examples, len(c.indices)), replace=False)
            idx = np.asarray(c.indices)[pick]
            g = per_example_gradients(model, exp.train, idx, exp.pad_token_id, params)
            row = {"run": run.name, "client": c.client_id, "client_share_majority": float((labels_all == majority).mean()), "majority": majority}
            row |= client_stats(g, labels_all[pick], majority, cfg.privacy.clip, bias_slice)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
