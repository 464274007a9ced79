"""README's "Sentence pairs as a bi-encoder" commands as a user runs them (from the repository root,
on the real MiniLM and the local RTE files), with a smaller budget appended; the merged encoder then
loads with transformers alone and, mean-pooled with the head beside it, predicts what the run measured."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
from reference import pair_cosines
from test_readme_decoder import BIN, ROOT, readme_block, run

pytestmark = pytest.mark.slow


def test_pair_commands_as_in_readme(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from fedlora.data.glue import load_glue

    block = readme_block("Sentence pairs as a bi-encoder").replace("\\\n", " ")
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["fedlora", "run"], ["fedlora", "merge"]]
    small = ["data.max_train_examples=96", "data.max_eval_examples=64", "fed.rounds=1", "train.epochs=1", "partition.num_clients=2", f"output_dir={tmp_path}"]
    run([str(BIN / "fedlora"), *commands[0][1:], *small], ROOT)
    name = next(a.split("=", 1)[1] for a in commands[0] if a.startswith("name="))
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert commands[1][2] == f"results/runs/evidence/{name}"  # README merges the folder its run wrote
    merged = tmp_path / "merged"
    run([str(BIN / "fedlora"), "merge", str(tmp_path / name), str(merged)], ROOT)

    encoder, tok = AutoModel.from_pretrained(merged).eval(), AutoTokenizer.from_pretrained(merged)
    head = json.loads((merged / "siamese_head.json").read_text())
    dev = load_glue("rte", "dev", data_dir=ROOT.parent / "shared" / "data" / "glue", max_examples=64, seed=0)
    cos = pair_cosines(encoder, tok, dev.text_a, dev.text_b, max_length=128).numpy()  # the README's model.max_length
    logits = cos[:, None] * np.array(head["weight"]) + np.array(head["bias"])
    accuracy = float((np.array(logits).argmax(1) == np.asarray(dev.labels)).mean())
    assert accuracy == pytest.approx(summary["final"]["accuracy"])
