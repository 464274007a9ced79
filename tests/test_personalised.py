"""FedSA-LoRA and personalised evaluation: clients keep B and the head as their own (never sent),
the server averages A; each client's own model is scored on a held-out split of its data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from engine_support import assert_tree_equal, overrides, read_jsonl, tiny_models  # noqa: F401
from helpers import SHAPES, make, run_round
from test_engine_resume import _interrupted_then_resumed

from fedlora import cli
from fedlora.config import load_config
from fedlora.engine import build_experiment, run_name
from fedlora.engine.experiment import personal_split


def test_fedsa_averages_A_only():
    import reference as ref

    agg, state = make("fedsa", SHAPES, rank=4)
    rnd = run_round(agg, state, [None] * 3, [5, 10, 25], seed=0)
    assert all(s.keep_local == ("B", "dense") for s in rnd.starts)
    for name in SHAPES:
        A = ref.weighted_sum([u.adapters[name].A for u in rnd.updates], ref.data_weights([5, 10, 25]))
        assert ref.rel_err(rnd.new.adapters[name].A, A) < 1e-6
        assert torch.equal(rnd.new.adapters[name].B, state.adapters[name].B)  # the server's B: never learned


def test_personal_split_is_disjoint_seeded_and_never_empty():
    idx = np.arange(100, 150)
    train, held = personal_split(idx, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40 and not set(train) & set(held) and set(train) | set(held) == set(idx)
    assert np.array_equal(personal_split(idx, 0.2, seed=3)[1], held) and not np.array_equal(personal_split(idx, 0.2, seed=4)[1], held)
    assert len(personal_split(np.arange(3), 0.01, seed=0)[1]) == 1 and personal_split(np.arange(1), 0.5, seed=0)[1] is None
    assert personal_split(idx, 0.0, seed=0)[1] is None


def test_fedsa_clients_keep_their_own_B_and_report_their_own_models(tiny_models, tmp_path):
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedsa", fed__personal_eval=0.25, train__lr=5e-3)
    assert cli.main(["run", *over]) == 0
    cfg = load_config(None, over)
    run = tmp_path / run_name(cfg)
    rows, clients = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "clients.jsonl")
    exp = build_experiment(cfg)
    held = {c.client_id: len(c.held_out) for c in exp.clients}
    assert all(c.held_out is not None and not set(c.held_out) & set(c.indices) for c in exp.clients)
    for t, row in enumerate(rows, start=1):
        mine = [c for c in clients if c["round"] == t]
        assert all(c["personal_n"] == held[c["client"]] for c in mine)
        want = sum(c["personal_accuracy"] * c["personal_n"] for c in mine) / sum(c["personal_n"] for c in mine)
        assert row["personal_accuracy"] == pytest.approx(want)
        having = [c for c in mine if "personal_roc_auc" in c]  # a held-out set of one class has none: not counted as 0
        if having:
            want = sum(c["personal_roc_auc"] * c["personal_n"] for c in having) / sum(c["personal_n"] for c in having)
            assert row["personal_roc_auc"] == pytest.approx(want)
        assert [c["examples"] for c in mine] == [len(cl.indices) for cl in exp.clients]
    summary = json.loads((run / "summary.json").read_text())  # what fedlora compare's personalised table reads
    assert summary["personal_final"]["accuracy"] == pytest.approx(rows[-1]["personal_accuracy"])
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    local = ckpt["local"]
    assert set(local) == {"client0", "client1", "client2"}
    mod = next(iter(local["client0"]["B"]))
    Bs = [local[c]["B"][mod] for c in sorted(local)]
    assert float(Bs[0].abs().max()) > 0 and not torch.equal(Bs[0], Bs[1]), "each client trained a B of its own"
    assert float(ckpt["state"]["adapters"][mod]["B"].abs().max()) == 0.0, "the server never saw a B"


def test_fedsa_resumes_with_the_clients_own_state(tiny_models, tmp_path):
    over_a = overrides(tiny_models["bert"], tmp_path / "A", fed__method="fedsa", fed__personal_eval=0.25)
    assert cli.main(["run", *over_a]) == 0
    cfg_b = load_config(None, overrides(tiny_models["bert"], tmp_path / "B", fed__method="fedsa", fed__personal_eval=0.25))
    run_b = _interrupted_then_resumed(cfg_b)
    a = torch.load(tmp_path / "A" / run_name(load_config(None, over_a)) / "checkpoint.pt", weights_only=True)
    b = torch.load(run_b / "checkpoint.pt", weights_only=True)
    assert_tree_equal(a["local"], b["local"], "local")
    assert [r["personal_accuracy"] for r in a["rounds"]] == [r["personal_accuracy"] for r in b["rounds"]]
