"""The one local training loop, used by every client of every engine and by
centralized training: AdamW (or SGD), linear warm-up/decay, gradient accumulation,
gradient clipping, length-bucketed batches, on the model's device under its
autocast precision (``models/device.py``; fp16 with a gradient scaler)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..config import TrainConfig
from ..data import collate, length_bucketed_batches
from ..models import FedModel
from .seeding import derive_seed, generator

__all__ = ["TrainStats", "train_local", "planned_steps", "planned_micro_batches", "optimizer_groups", "make_optimizer"]


@dataclass
class TrainStats:
    loss: float
    steps: int
    examples: int
    tokens: int  # padded tokens through forward and backward: the compute actually done
    sample_rate: float = 0.0  # local DP-SGD: q of its Poisson batches (0: not DP)
    personal: dict[str, float] | None = None  # fed.personal_eval: its own model's metrics on its held-out examples
    received: dict[str, float] | None = None  # fed.received_eval: the model it received, before training, on the same examples
    personal_n: int = 0  # its held-out examples

    def as_dict(self) -> dict[str, float]:
        out = {"loss": self.loss, "steps": self.steps, "examples": self.examples, "tokens": self.tokens}
        if self.sample_rate:
            out["sample_rate"] = self.sample_rate
        if self.personal:
            out.update({f"personal_{k}": v for k, v in self.personal.items()} | {"personal_n": self.personal_n})
        if self.received:
            out.update({f"received_{k}": v for k, v in self.received.items()})
        return out


def planned_micro_batches(num_examples: int, cfg: TrainConfig) -> int:
    """Forward–backward passes for one round: ``train.steps`` × ``grad_accum`` when steps are given,
    else ⌈epochs · ⌈n / batch_size⌉⌉ (≥ 1: the partitions and the personal split never leave a client
    empty, and the loop over no batches would never end)."""
    if num_examples < 1:
        raise ValueError("a client with no examples cannot train")
    if cfg.steps > 0:
        return cfg.steps * cfg.grad_accum
    return max(1, math.ceil(math.ceil(num_examples / cfg.batch_size) * cfg.epochs))


def planned_steps(num_examples: int, cfg: TrainConfig) -> int:
    """Optimiser steps for one round of local training on ``num_examples``: ⌈micro-batches / grad_accum⌉,
    the last step accumulating what is left of the epochs (fewer than ``grad_accum`` micro-batches)."""
    return math.ceil(planned_micro_batches(num_examples, cfg) / cfg.grad_accum)


REGRESSION_HEAD_FACTOR = 10.0


def head_lr(fm: FedModel, cfg: TrainConfig) -> float:
    """``train.head_lr``, or when it is 0: ``train.lr`` for a classification head and 10×
    ``train.lr`` for a regression head (one output). Measured (BENCHMARKS.md "Task recipes",
    "The head's learning rate"): STS-B's regression head stays at the mean score with the
    adapters' rate (Pearson 0.21, against 0.84 at 10×), while a classification head at 10× the
    adapters' rate was never better on the label-skewed README example and lost 10–14 points
    in two of four paired runs (fedit and hexa, two seeds: weak evidence, so the old behaviour,
    the adapters' rate, stays the default for classification)."""
    if cfg.head_lr > 0:
        return cfg.head_lr
    regression = getattr(fm.peft.get_base_model().config, "num_labels", 2) == 1
    return cfg.lr * (REGRESSION_HEAD_FACTOR if regression else 1.0)


def optimizer_groups(fm: FedModel, params: list, cfg: TrainConfig) -> list[dict]:
    """The adapters at ``train.lr``, the head at :func:`head_lr`."""
    head = {id(p) for p in fm.head.values()}
    groups = [{"params": [p for p in params if id(p) not in head]}, {"params": [p for p in params if id(p) in head], "lr": head_lr(fm, cfg)}]
    return [g for g in groups if g["params"]]


def make_optimizer(fm: FedModel, params: list, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``train.optimizer``: AdamW (decoupled weight decay), or SGD, θ ← θ − η·(g + λ·θ) with optional
    heavy-ball momentum v ← μ·v + g + λ·θ, θ ← θ − η·v (torch's SGD; λ = ``weight_decay`` as L2). SGD
    is FedAvg's local optimiser and the one DP-FedAvg's analysis assumes; with AdamW a client's first
    step moves every coordinate by about η whatever its gradient, so its update's norm says little
    about its data. Both take the groups of :func:`optimizer_groups`."""
    groups = optimizer_groups(fm, params, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_local(
    fm: FedModel, data, indices: np.ndarray, cfg: TrainConfig, seed: int, *, pad_token_id: int, progress=None, regulariser: Callable[[], Tensor] | None = None
) -> TrainStats:
    """Train the active adapter and the head of ``fm`` on ``data[indices]``, minimising the task loss
    plus ``regulariser()`` when given (a function of the parameters: HetLoRA's tail norm). The loss
    reported is the task's.

    A fresh optimiser per call (as FedEx-LoRA's code does per round), so no
    optimiser state is carried between rounds or swapped between clients.
    """
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(derive_seed(seed, "dropout"))
    gen = generator(seed, "batches")
    params = fm.trainable_parameters()
    opt = make_optimizer(fm, params, cfg)
    total = planned_steps(len(indices), cfg)
    micro_total = planned_micro_batches(len(indices), cfg)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    place = fm.placement
    scaler = torch.amp.GradScaler(place.device.type) if place.needs_scaler else None
    model = fm.peft
    model.train()
    steps, micro, examples, tokens, loss_n = 0, 0, 0, 0, 0
    # On the device (no sync per step); MPS has no float64.
    acc = torch.float32 if place.device.type == "mps" else torch.float64
    loss_sum = torch.zeros((), dtype=acc, device=place.device)
    while steps < total:
        for batch_idx in length_bucketed_batches(data.lengths, indices, cfg.batch_size, generator=gen, shuffle=True):
            batch = place.batch(collate(data, batch_idx, pad_token_id))
            with place.autocast():
                loss = model(**batch).loss
            # The step's gradient is the mean over its micro-batches; the last step of the round takes only
            # what is left of the epochs (so a round never runs into the next epoch's batches).
            group = min(cfg.grad_accum, micro_total - steps * cfg.grad_accum)
            objective = loss.float() if regulariser is None else loss.float() + regulariser()
            scaled = objective / group
            (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += loss.detach().to(acc) * len(batch_idx)
            loss_n += len(batch_idx)
            examples += len(batch_idx)
            tokens += batch["input_ids"].numel()
            micro += 1
            if micro - steps * cfg.grad_accum == group:
                if scaler:
                    scaler.unscale_(opt)  # clip the true gradients
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
                if progress is not None:
                    progress.update(1)
                if steps >= total:
                    break
    model.eval()
    return TrainStats(loss=float(loss_sum) / max(loss_n, 1), steps=steps, examples=examples, tokens=tokens)
