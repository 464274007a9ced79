"""``train.optimizer``: SGD steps against heavy-ball SGD computed by hand, and the settings it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_privacy import _batch, _tiny_fm

import fedlora.engine.train as plain
from fedlora.config import ConfigError, TrainConfig, load_config


def _sgd_setup():
    """A tiny BERT, its four-example batch, the trainable (name, parameter)s, each one's SGD rate (adapters
    0.05, head 0.2) and their starting values."""
    fm = _tiny_fm("bert")
    named = [(n, p) for n, p in fm.peft.named_parameters() if p.requires_grad]
    head = {id(p) for p in fm.head.values()}
    rate = {n: 0.2 if id(p) in head else 0.05 for n, p in named}
    return fm, _batch("bert"), named, rate, {n: p.detach().clone() for n, p in named}


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_takes_the_hand_computed_heavy_ball_steps(momentum):
    """Three full-batch steps (4 examples, batch 4), adapters at η = 0.05 and the head at 0.2, linear decay
    over 3 steps (factors 1, 2/3, 1/3): v ← μ·v + ∇L(θ), θ ← θ − η·f_t·v, the gradients by autograd
    at each θ_t and the update in float64 by hand, never through torch.optim."""
    fm, batch, named, rate, start = _sgd_setup()

    theta = {n: p.double() for n, p in start.items()}
    velocity = {n: torch.zeros_like(t) for n, t in theta.items()}
    for factor in (1.0, 2 / 3, 1 / 3):
        with torch.no_grad():
            for n, p in named:
                p.copy_(theta[n].float())
        grads = torch.autograd.grad(fm.peft(**batch).loss, [p for _, p in named])
        for (n, _), g in zip(named, grads, strict=True):
            velocity[n] = momentum * velocity[n] + g.double()
            theta[n] = theta[n] - rate[n] * factor * velocity[n]

    with torch.no_grad():
        for n, p in named:
            p.copy_(start[n])

    class Data:  # the four examples stand for the engine's tokenised data (collate is replaced)
        lengths = batch["attention_mask"].sum(1).numpy()

    cfg = TrainConfig(optimizer="sgd", momentum=momentum, lr=0.05, head_lr=0.2, weight_decay=0.0, steps=3, batch_size=4, warmup_ratio=0.0, max_grad_norm=0.0)
    real, plain.collate = plain.collate, lambda data, idx, pad: {k: v[torch.as_tensor(np.sort(idx))] for k, v in batch.items()}
    try:
        stats = plain.train_local(fm, Data(), np.arange(4), cfg, seed=0, pad_token_id=0)
    finally:
        plain.collate = real
    assert stats.steps == 3
    for n, p in fm.peft.named_parameters():
        if n in theta:
            assert not torch.equal(p.detach(), start[n]), f"{n} did not move: the check would have no power"
            torch.testing.assert_close(p.detach().double(), theta[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize(
    "settings,named",
    [
        (["train.optimizer=adam"], "train.optimizer must be adamw or sgd"),
        (["train.optimizer=sgd", "train.momentum=1.0"], r"train.momentum must be in \[0, 1\)"),
        (["train.momentum=0.9"], "train.momentum=0.9 applies to train.optimizer=sgd only"),
    ],
)
def test_optimizer_settings_that_make_no_sense_are_refused(settings, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, settings)


def test_a_client_without_examples_is_an_error_not_an_endless_loop():
    """The loop runs until it has taken its planned steps (≥ 1); over no examples it would never get one."""
    from fedlora.config import TrainConfig
    from fedlora.engine.train import planned_steps

    with pytest.raises(ValueError, match="no examples"):
        planned_steps(0, TrainConfig())
    assert planned_steps(1, TrainConfig(batch_size=8, epochs=2)) == 2


def test_the_last_accumulated_step_takes_what_is_left_of_the_epoch_and_no_more():
    """4 examples, batch 1, grad_accum 3, one epoch: two SGD steps, the first the mean gradient of three
    examples, the second the gradient of the fourth alone (factor 1/2 of the linear decay), each example
    seen once. Before, the second step ran on into a second epoch (6 examples) and divided by 3 anyway."""
    fm, batch, named, rate, start = _sgd_setup()

    class Data:
        lengths = batch["attention_mask"].sum(1).numpy()

    seen: list[int] = []

    def collate(data, idx, pad):
        seen.extend(int(i) for i in idx)
        return {k: v[torch.as_tensor(idx)] for k, v in batch.items()}

    cfg = TrainConfig(optimizer="sgd", lr=0.05, head_lr=0.2, weight_decay=0.0, epochs=1, batch_size=1, grad_accum=3, warmup_ratio=0.0, max_grad_norm=0.0)
    real, plain.collate = plain.collate, collate
    try:
        stats = plain.train_local(fm, Data(), np.arange(4), cfg, seed=0, pad_token_id=0)
    finally:
        plain.collate = real
    assert stats.steps == 2 and stats.examples == 4
    assert sorted(seen) == [0, 1, 2, 3], f"micro-batches past the epoch: {seen}"

    trained = {n: p.detach().clone() for n, p in named}
    theta = {n: t.double() for n, t in start.items()}
    for group, factor in ((seen[:3], 1.0), (seen[3:], 0.5)):
        with torch.no_grad():
            for n, p in named:
                p.copy_(theta[n].float())
        total = None
        for j in group:  # the mean of the group's single-example gradients
            grads = torch.autograd.grad(fm.peft(**{k: v[j : j + 1] for k, v in batch.items()}).loss, [p for _, p in named])
            total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
        for (n, _), g in zip(named, total, strict=True):
            theta[n] = theta[n] - rate[n] * factor * g.double() / len(group)
    for n in trained:
        assert not torch.equal(trained[n], start[n]), f"{n} did not move: the check would have no power"
        torch.testing.assert_close(trained[n].double(), theta[n], atol=1e-6, rtol=1e-5, msg=n)
