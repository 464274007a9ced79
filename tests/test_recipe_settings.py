"""Settings the task recipes rely on: an evaluation set held out of the training data
(``data.eval_split=holdout``, so sweeps never see dev) and a separate head learning rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from engine_support import GLUE, overrides, tiny_models  # noqa: F401

from fedlora.config import ConfigError, load_config
from fedlora.data import load_glue
from fedlora.engine import build_experiment
from fedlora.engine.train import train_local


def _pairs(ds) -> set[tuple]:
    return set(zip(ds.text_a, ds.text_b or [None] * len(ds), ds.labels.tolist()))


def test_holdout_comes_from_train_is_fixed_across_seeds_and_disjoint(tiny_models, tmp_path):
    from fedlora.engine.experiment import load_datasets

    sets = {}
    for seed in (0, 1):
        cfg = load_config(None, overrides(tiny_models["bert"], tmp_path, data__task="rte", data__eval_split="holdout", data__holdout_examples=50, seed=seed))
        _, train, held = load_datasets(cfg)
        assert len(held) == 50 and len(train) == 80
        sets[seed] = (_pairs(train), _pairs(held))
    full_train = _pairs(load_glue("rte", "train", data_dir=GLUE))
    dev = _pairs(load_glue("rte", "dev", data_dir=GLUE))
    assert sets[0][1] == sets[1][1], "the held-out set is the same for every seed"
    assert sets[0][0] != sets[1][0], "seeds draw different training subsets"
    for seed in (0, 1):
        train, held = sets[seed]
        assert held <= full_train and not held & dev and not train & held


def test_holdout_min_words_holds_out_whole_sentences_and_their_phrases(tiny_models, tmp_path):
    from fedlora.engine.experiment import load_datasets

    full = load_glue("sst2", "train", data_dir=GLUE)
    words = lambda text: len(text.split())  # noqa: E731
    held_sets = []
    for seed in (0, 1):
        cfg = load_config(
            None,
            overrides(
                tiny_models["bert"], tmp_path, data__task="sst2", data__eval_split="holdout", data__holdout_examples=40, data__holdout_min_words=15, seed=seed
            ),
        )
        _, train, held = load_datasets(cfg)
        assert len(held) == 40 and min(words(t) for t in held.text_a) >= 15
        assert any(words(t) < 15 for t in train.text_a), "short examples stay trainable"
        assert not set(train.text_a) & set(held.text_a)
        # no trained phrase is cut from a held-out sentence (checked by plain substring search on word boundaries)
        padded = [f" {' '.join(t.split())} " for t in held.text_a]
        assert not [t for t in train.text_a if any(f" {' '.join(t.split())} " in h for h in padded)]
        held_sets.append(held.text_a)
    # and no held-out sentence is a phrase cut from a longer example (whose sentence would stay in training)
    longer = [f" {' '.join(t.split())} " for t in full.text_a if words(t) > 15]
    assert not [h for h in padded if any(h in t and h != t for t in longer)]
    assert held_sets[0] == held_sets[1]
    # ... and those phrases exist in SST-2's training set: the rule removes something
    padded = [f" {' '.join(t.split())} " for t in held_sets[0]]
    cut = [t for t in full.text_a if t not in held_sets[0] and any(f" {' '.join(t.split())} " in h for h in padded)]
    assert len(cut) > len(held_sets[0])
    cfg = load_config(
        None,
        overrides(
            tiny_models["bert"], tmp_path, data__task="sst2", data__eval_split="holdout", data__holdout_examples=len(full) - 1, data__holdout_min_words=15
        ),
    )
    with pytest.raises(ConfigError, match=r"the training set has \d+ whole sentences with ≥ 15 words"):
        load_datasets(cfg)


def test_holdout_larger_than_the_training_set_is_refused(tiny_models, tmp_path):
    from fedlora.engine.experiment import load_datasets

    cfg = load_config(None, overrides(tiny_models["bert"], tmp_path, data__task="rte", data__eval_split="holdout", data__holdout_examples=10**6))
    with pytest.raises(ConfigError, match="holdout_examples=1000000"):
        load_datasets(cfg)


@pytest.mark.parametrize("lr,head_lr,moves", [(1e-9, 1e-2, "head"), (1e-2, 1e-9, "adapter")])
def test_head_lr_is_the_heads_own(tiny_models, tmp_path, lr, head_lr, moves):
    cfg = load_config(None, overrides(tiny_models["bert"], tmp_path, train__lr=lr, train__head_lr=head_lr, train__warmup_ratio=0))
    exp = build_experiment(cfg)
    fm = exp.fm
    head0 = {k: v.clone() for k, v in fm.read_dense().items()}
    train_local(fm, exp.train, np.arange(40), cfg.train, seed=0, pad_token_id=exp.pad_token_id)
    head_move = max(float((fm.read_dense()[k] - v).abs().max()) for k, v in head0.items())
    b_move = max(float(a.B.abs().max()) for a in fm.read_adapters().values())  # B starts at zero
    if moves == "head":
        assert head_move > 1e-3 and b_move < 1e-6
    else:
        assert b_move > 1e-3 and head_move < 1e-6


@pytest.mark.parametrize("regression,given,want", [(False, 0.0, 2e-3), (True, 0.0, 2e-2), (True, 5e-3, 5e-3), (False, 5e-3, 5e-3)])
def test_the_heads_default_rate_follows_the_head(regression, given, want):
    """head_lr 0: the adapters' rate for a classification head, 10× for a regression head (one
    output); a head_lr given is used as it is."""
    from fedlora.config import TrainConfig
    from fedlora.engine.train import optimizer_groups
    from fedlora.models import FedModel, LoraSettings, tiny_model

    model, _ = tiny_model("bert", num_labels=1 if regression else 2, regression=regression)
    fm = FedModel(model, LoraSettings(("query", "value"), rank=2), head=True)
    fm.activate(2)
    groups = optimizer_groups(fm, fm.trainable_parameters(), TrainConfig(lr=2e-3, head_lr=given))
    adapters, head = groups
    assert "lr" not in adapters and head["lr"] == pytest.approx(want)
    assert {id(p) for p in head["params"]} == {id(p) for p in fm.head.values()}


RECIPES = Path(__file__).resolve().parents[1] / "benchmarks" / "recipes"


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_benchmark_recipe_is_a_valid_config(recipe):
    cfg = load_config(str(RECIPES / recipe), [])
    assert cfg.fed.rounds >= 10 and cfg.model.rank >= 1


@pytest.mark.parametrize("task", ["cola", "rte", "mrpc", "sst2", "qnli", "stsb"])
def test_fedex_table3_recipe_is_the_papers_setting(task):
    """FedEx-LoRA Table 3 (methods.md §4.3): RoBERTa-base, r=4, α=8, dropout 0.1, query/value, AdamW lr 1e-3,
    weight decay 0.01, batch 128, warm-up 0.06, 3 clients, 3 local epochs, 50 rounds, max length 128."""
    cfg = load_config(str(RECIPES / "fedex_table3.yaml"), [f"data.task={task}", "train.head_lr=1e-3"])  # the script's overrides
    m, t = cfg.model, cfg.train
    assert (m.name, m.rank, m.alpha, m.dropout, tuple(m.target_modules), m.max_length) == ("roberta-base", 4, 8, 0.1, ("query", "value"), 128)
    assert (t.lr, t.head_lr, t.weight_decay, t.batch_size, t.warmup_ratio, t.epochs) == (1e-3, 1e-3, 0.01, 128, 0.06, 3)
    assert (cfg.partition.num_clients, cfg.partition.scheme, cfg.fed.rounds) == (3, "iid", 50)
