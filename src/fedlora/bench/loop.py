"""``fedlora bench loop``: fedlora's training loop against a plain peft + torch loop.

Both train the same peft LoRA model (the run's ``FedModel``, so the same adapters,
head, device and autocast precision) for the same optimiser steps on the same
batches: the plain loop takes exactly the index batches ``train_local`` draws for
that seed and collates each as it goes, as a DataLoader would. The plain loop is
the textbook one: collate, forward under autocast, ``loss.backward()``, clip,
``AdamW.step()`` (``SGD.step()`` with ``train.optimizer=sgd``), ``zero_grad``. fedlora's
is ``engine.train.train_local``, the loop every client runs (learning-rate schedule, accumulation and counters included). They alternate
``--repeats`` times; the command prints padded tokens per second of each and the
ratio fedlora ÷ plain per repeat and its median (target ≥ 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ..config import ConfigError, load_config
from ..data import collate, length_bucketed_batches
from ..engine.experiment import build_experiment
from ..engine.seeding import generator
from ..engine.train import planned_steps, train_local


def _plain_loop(model, params, data, index_batches, pad_token_id, cfg, place) -> float:
    # The optimiser the run names, built the textbook way (one group, no head rate).
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    t0 = time.perf_counter()
    for idx in index_batches:
        batch = place.batch(collate(data, idx, pad_token_id))
        with place.autocast():
            loss = model(**batch).loss
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if place.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _time_train_local(exp, indices, cfg, seed: int, tokens: int) -> float:
    """Tokens per second of ``train_local`` for ``seed``; refuses a run whose batches differ from the plain loop's."""
    t0 = time.perf_counter()
    stats = train_local(exp.fm, exp.train, indices, cfg, seed=seed, pad_token_id=exp.pad_token_id)
    if exp.fm.placement.device.type == "cuda":
        torch.cuda.synchronize()
    if stats.tokens != tokens:  # the comparison is void unless both loops see the same batches
        raise RuntimeError(f"train_local saw {stats.tokens} padded tokens, the plain loop's batches hold {tokens}")
    return tokens / (time.perf_counter() - t0)


def measure(config: str | None, overrides: list[str], repeats: int = 3, steps: int = 20) -> list[dict]:
    cfg = load_config(config, [*overrides, "progress=false", f"train.steps={steps}", "train.grad_accum=1"])
    if cfg.data.node_data:
        raise ConfigError("data.node_data=true: the training rows are the Flower nodes' own; the loop benchmark trains on the run's: set it false")
    exp = build_experiment(cfg)
    fm, place = exp.fm, exp.fm.placement
    indices = np.arange(len(exp.train))
    total = planned_steps(len(indices), cfg.train)
    rows = []
    for r in range(repeats):
        # The index batches train_local draws for seed r (its generator, its epochs).
        gen, index_batches = generator(r, "batches"), []
        while len(index_batches) < total:
            index_batches += length_bucketed_batches(exp.train.lengths, indices, cfg.train.batch_size, generator=gen, shuffle=True)
        index_batches = index_batches[:total]
        tokens = sum(len(b) * int(exp.train.lengths[b].max()) for b in index_batches)
        # Alternate which loop goes first, so neither always inherits the other's warm caches.
        if r % 2:
            p_tps = tokens / _plain_loop(fm.peft, fm.trainable_parameters(), exp.train, index_batches, exp.pad_token_id, cfg.train, place)
            o_tps = _time_train_local(exp, indices, cfg.train, r, tokens)
        else:
            o_tps = _time_train_local(exp, indices, cfg.train, r, tokens)
            p_tps = tokens / _plain_loop(fm.peft, fm.trainable_parameters(), exp.train, index_batches, exp.pad_token_id, cfg.train, place)
        rows.append({"repeat": r, "fedlora_tokens_per_s": o_tps, "plain_tokens_per_s": p_tps, "ratio": o_tps / p_tps})
    return rows


def main(args: argparse.Namespace) -> int:
    rows = measure(args.config, args.overrides, args.repeats, args.steps)
    for r in rows:
        print(
            f"repeat {r['repeat']}: fedlora {r['fedlora_tokens_per_s']:.0f} tokens/s, plain peft+torch {r['plain_tokens_per_s']:.0f} tokens/s, ratio {r['ratio']:.3f}"
        )
    print(f"median ratio fedlora ÷ plain = {statistics.median(r['ratio'] for r in rows):.3f}  (target ≥ 0.95)")
    return 0
