"""engine/experiment.py's data loading: user files (classes of integer labels, subsets), the
held-out split, the label histogram of a run. Expected values come from the files written here."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from engine_support import overrides, tiny_models  # noqa: F401

from fedlora import cli
from fedlora.config import ConfigError, load_config
from fedlora.data import DataError, TextDataset
from fedlora.engine.experiment import holdout_split, load_datasets

WORDS = ["good", "bad", "fine", "movie", "film", "plot", "great", "awful"]


def write_csv(path: Path, labels, texts=None) -> Path:
    rng = np.random.default_rng(len(labels))
    texts = texts or [" ".join(rng.choice(WORDS, 4)) + f" {i}" for i in range(len(labels))]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))
    return path


def file_config(tmp_path, train, dev, *extra):
    return load_config(None, ["data.task=file", f"data.train_file={train}", f"data.eval_file={dev}", f"output_dir={tmp_path / 'runs'}", *extra])


def test_integer_labels_without_names_are_classes_0_to_the_largest_id(tmp_path):
    """ids {0, 2}: three classes "0", "1", "2" (1 never occurs but is an id below the largest)."""
    train = write_csv(tmp_path / "train.csv", [0, 2, 2, 0, 2, 0])
    dev = write_csv(tmp_path / "dev.csv", [2, 1, 0])
    task, tr, ev = load_datasets(file_config(tmp_path, train, dev))
    assert task.label_names == ("0", "1", "2") and task.num_labels == 3 and not task.is_regression
    assert tr.labels.tolist() == [0, 2, 2, 0, 2, 0] and ev.labels.tolist() == [2, 1, 0]
    assert tr.label_names == ev.label_names == ["0", "1", "2"]


def test_an_evaluation_id_beyond_the_training_ids_is_refused_by_line(tmp_path):
    train = write_csv(tmp_path / "train.csv", [0, 1, 1, 0])
    dev = write_csv(tmp_path / "dev.csv", [1, 0, 2])
    with pytest.raises(DataError, match=r"dev\.csv:4: label 2 is no class of the training data, whose label ids are 0\.\.1"):
        load_datasets(file_config(tmp_path, train, dev))


def test_ids_that_make_more_classes_than_examples_are_refused(tmp_path):
    train = write_csv(tmp_path / "train.csv", [0, 1, 1000000])
    with pytest.raises(DataError, match=r"train\.csv: the largest label id is 1000000, which makes 1000001 classes for 3 examples"):
        load_datasets(file_config(tmp_path, train, train))


def test_file_task_takes_max_train_and_eval_examples(tmp_path):
    """A training subset per seed, one evaluation subset for every seed, rows of the files."""
    labels = [i % 3 for i in range(60)]
    train, dev = write_csv(tmp_path / "train.csv", labels), write_csv(tmp_path / "dev.csv", labels[:40])
    rows = {r["text"]: int(r["label"]) for r in csv.DictReader(train.open())}
    dev_rows = [r["text"] for r in csv.DictReader(dev.open())]
    subsets = {}
    for seed in (0, 1):
        _, tr, ev = load_datasets(file_config(tmp_path, train, dev, "data.max_train_examples=25", "data.max_eval_examples=10", f"seed={seed}"))
        assert len(tr) == 25 and len(set(tr.text_a)) == 25 and all(rows[t] == y for t, y in zip(tr.text_a, tr.labels))
        assert len(ev) == 10 and set(ev.text_a) <= set(dev_rows)
        subsets[seed] = (tuple(tr.text_a), tuple(ev.text_a))
    assert subsets[0][0] != subsets[1][0] and subsets[0][1] == subsets[1][1]
    _, tr, ev = load_datasets(file_config(tmp_path, train, dev))
    assert len(tr) == 60 and len(ev) == 40  # 0: all


def test_instruct_with_a_holdout_split_is_refused(tmp_path):
    f = tmp_path / "i.jsonl"
    f.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    cfg = load_config(None, ["data.task=instruct", f"data.train_file={f}", f"data.eval_file={f}", "data.eval_split=holdout"])
    with pytest.raises(ConfigError, match=r"data\.eval_split=holdout does not apply to data\.task=instruct"):
        load_datasets(cfg)


@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
def test_holdout_keeps_duplicates_of_held_out_texts_out_of_training(pairs):
    """Every text occurs twice (once with extra spaces): whichever copy is held out, the other
    must leave training, or the model trains on what it is then scored on as unseen."""
    base = [f"sentence number {i} here" for i in range(50)]
    text_a = base + [t.replace(" ", "  ") for t in base]
    text_b = [f"other {i % 50}" for i in range(100)] if pairs else None
    full = TextDataset(text_a, text_b, np.arange(100) % 2)
    train, held = holdout_split(full, 10, 0, seed=0, min_words=0)
    norm = lambda t: " ".join(t.split())  # noqa: E731
    held_keys = {norm(a) for a in held.text_a}
    assert len(held) == 10 and not held_keys & {norm(a) for a in train.text_a}
    copies = Counter(norm(a) for a in held.text_a)  # a text held out twice leaves no copy behind
    assert len(train) == 100 - 10 - sum(2 - c for c in copies.values())
    if pairs:  # the same first sentence with another second one is another example: kept
        full = TextDataset(text_a, [f"other {i}" for i in range(100)], np.arange(100) % 2)
        train, held = holdout_split(full, 10, 0, seed=0, min_words=0)
        assert len(train) == 90


def _histogram(run_dir: Path) -> list[list[str]]:
    return list(csv.reader((run_dir / "label_histogram.csv").open()))


def _run(tiny_models, tmp_path, *extra) -> Path:  # noqa: F811
    out = tmp_path / "runs"
    argv = ["run", *overrides(tiny_models["bert"], out, fed__rounds=1, partition__num_clients=2, data__max_eval_examples=0, data__max_train_examples=0), *extra]
    assert cli.main([*argv, "name=r"]) == 0
    return out / "r"


def test_a_run_on_integer_labels_without_names(tiny_models, tmp_path):  # noqa: F811
    """The documented default (integer labels, no data.label_names) trains a 3-class head and
    names the histogram's columns by id; the counts are the training file's."""
    labels = [0, 1, 2] * 8
    train, dev = write_csv(tmp_path / "train.csv", labels), write_csv(tmp_path / "dev.csv", [2, 1, 0, 0])
    run = _run(tiny_models, tmp_path, "data.task=file", f"data.train_file={train}", f"data.eval_file={dev}")
    hist = _histogram(run)
    assert hist[0] == ["client", "0", "1", "2", "total"]
    assert [sum(int(r[c]) for r in hist[1:]) for c in (1, 2, 3)] == [8, 8, 8]
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["final"]["accuracy"] <= 1.0


def test_histogram_keeps_classes_no_training_example_has(tiny_models, tmp_path):  # noqa: F811
    """data.label_names [neg, neu, pos], training labels neg and neu only: a pos column of zeros."""
    train = write_csv(tmp_path / "train.csv", ["neg", "neu"] * 6)
    dev = write_csv(tmp_path / "dev.csv", ["neg", "pos", "neu"])
    run = _run(tiny_models, tmp_path, "data.task=file", f"data.train_file={train}", f"data.eval_file={dev}", "data.label_names=[neg,neu,pos]")
    hist = _histogram(run)
    assert hist[0] == ["client", "neg", "neu", "pos", "total"]
    assert [sum(int(r[c]) for r in hist[1:]) for c in (1, 2, 3)] == [6, 6, 0]
