"""``fedlora bench loop``: fedlora's training loop against a plain peft + torch loop.

Both train the same peft LoRA model (the run's ``FedModel``, so the same adapters,
head, device and autocast precision) for the same optimiser steps on the same
batches (length-bucketed and collated once, before timing). The plain loop is the
textbook one: forward under autocast, ``loss.backward()``, clip, ``AdamW.step()``,
``zero_grad``. fedlora's is ``engine.train.train_local``, the loop every client
runs (its batching and collation included, as in a real round). They alternate
``--repeats`` times; the command prints padded tokens per second of each and the
ratio fedlora ÷ plain per repeat and its median (target ≥ 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ..config import load_config
from ..data import collate, length_bucketed_batches
from ..engine.experiment import build_experiment
from ..engine.seeding import generator
from ..engine.train import planned_steps, train_local


def _plain_loop(model, params, batches, cfg, place) -> float:
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    t0 = time.perf_counter()
    for batch in batches:
        with place.autocast():
            loss = model(**batch).loss
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if place.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(config: str | None, overrides: list[str], repeats: int = 3, steps: int = 20) -> list[dict]:
    cfg = load_config(config, [*overrides, "progress=false", f"train.steps={steps}", "train.grad_accum=1"])
    exp = build_experiment(cfg)
    fm, place = exp.fm, exp.fm.placement
    indices = np.arange(len(exp.train))
    total = planned_steps(len(indices), cfg.train)
    order = length_bucketed_batches(exp.train.lengths, indices, cfg.train.batch_size, generator=generator(0, "batches"), shuffle=True)
    batches = [place.batch(collate(exp.train, b, exp.pad_token_id)) for b in (order * (total // len(order) + 1))[:total]]
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    rows = []
    for r in range(repeats):
        t0 = time.perf_counter()
        stats = train_local(fm, exp.train, indices, cfg.train, seed=r, pad_token_id=exp.pad_token_id)
        if place.device.type == "cuda":
            torch.cuda.synchronize()
        ours = stats.tokens / (time.perf_counter() - t0)
        plain = tokens / _plain_loop(fm.peft, fm.trainable_parameters(), batches, cfg.train, place)
        rows.append({"repeat": r, "fedlora_tokens_per_s": ours, "plain_tokens_per_s": plain, "ratio": ours / plain})
    return rows


def main(args: argparse.Namespace) -> int:
    rows = measure(args.config, args.overrides, args.repeats, args.steps)
    for r in rows:
        print(
            f"repeat {r['repeat']}: fedlora {r['fedlora_tokens_per_s']:.0f} tokens/s, plain peft+torch {r['plain_tokens_per_s']:.0f} tokens/s, ratio {r['ratio']:.3f}"
        )
    print(f"median ratio fedlora ÷ plain = {statistics.median(r['ratio'] for r in rows):.3f}  (target ≥ 0.95)")
    return 0
