"""`fedlora plan`: what a configuration will do, without training. Its predictions are checked
against the runs they predict (the ε each reports round by round) and against hand counts."""

from __future__ import annotations

import json
import math

import pytest
from engine_support import overrides, read_jsonl, tiny_models  # noqa: F401

from fedlora import cli
from fedlora.config import load_config


def _plan(over, capsys) -> dict:
    assert cli.main(["plan", "--json", *over]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_local_dp_plan_is_what_the_run_spends(tiny_models, tmp_path, capsys):
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedit", fed__rounds=2, privacy__mode="local", privacy__target_epsilon=4, privacy__delta=1e-3)
    plan = _plan(over, capsys)
    assert not list(tmp_path.iterdir()), "a plan trains nothing and writes nothing"
    cfg = load_config(None, over)
    for c in plan["clients"]:  # one epoch a round: ⌈n / batch⌉ steps, at q = batch / n
        assert c["steps_per_round"] == math.ceil(c["examples"] / cfg.train.batch_size) and c["sample_rate"] == cfg.train.batch_size / c["examples"]
    assert sum(c["examples"] for c in plan["clients"]) == cfg.data.max_train_examples and plan["privacy"]["epsilon"] <= 4
    assert cli.main(["run", *over]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    last = {c["client"]: c["epsilon"] for c in read_jsonl(run / "clients.jsonl") if c["round"] == 2}
    assert last == pytest.approx({c["client"]: c["epsilon"] for c in plan["clients"]}, rel=1e-9)
    assert json.loads((run / "summary.json").read_text())["noise_multiplier"] == pytest.approx(plan["privacy"]["noise_multiplier"], rel=1e-12)


def test_the_client_dp_plan_is_what_the_run_reports_each_round(tiny_models, tmp_path, capsys):
    dp = dict(privacy__mode="client", fed__weighting="uniform", privacy__noise_multiplier=0.7, privacy__delta=1e-3)
    over = overrides(tiny_models["bert"], tmp_path, fed__method="ffa", partition__num_clients=6, fed__fraction=0.5, fed__rounds=3, **dp)
    plan = _plan(over, capsys)
    assert plan["privacy"]["sample_rate"] == 0.5 and plan["privacy"]["noise_multiplier"] == 0.7
    assert cli.main(["run", *over]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert [r["epsilon"] for r in read_jsonl(run / "metrics.jsonl")] == pytest.approx(plan["privacy"]["epsilon_by_round"], rel=1e-12)


def test_the_plan_in_words_and_its_refusals(tiny_models, tmp_path, capsys):
    over = overrides(tiny_models["bert"], tmp_path, fed__method="hexa")
    assert cli.main(["plan", *over]) == 0
    out = capsys.readouterr().out
    assert "hexa, 3 clients, 3 rounds" in out and "no differential privacy" in out and out.count("client") >= 4
    assert cli.main(["plan", *over, "privacy.mode=local", "privacy.target_epsilon=0.001", "privacy.delta=1e-3"]) == 2
    assert "cannot be met" in capsys.readouterr().err
    assert cli.main(["plan", *over, "data.node_data=true", "data.label_names=[negative,positive]"]) == 2
    assert "data.node_data=true" in capsys.readouterr().err
