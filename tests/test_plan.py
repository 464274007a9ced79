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
    """Two of three clients a round (fixed-size draws from the seed), two micro-batches a step: each
    client's ε is the accountant's for the rounds it is sampled in, as the run then reports it."""
    dp = dict(privacy__mode="local", privacy__target_epsilon=4, privacy__delta=1e-3)
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedit", fed__rounds=3, fed__fraction=0.67, train__grad_accum=2, **dp)
    plan = _plan(over, capsys)
    assert not list(tmp_path.iterdir()), "a plan trains nothing and writes nothing"
    cfg = load_config(None, over)
    for c in plan["clients"]:  # one epoch a round: ⌈⌈n / batch⌉ / 2⌉ steps, at q = 2·batch / n
        assert c["steps_per_round"] == math.ceil(math.ceil(c["examples"] / cfg.train.batch_size) / 2)
        assert c["sample_rate"] == 2 * cfg.train.batch_size / c["examples"]
    assert sum(c["rounds"] for c in plan["clients"]) == 2 * 3 and len({c["rounds"] for c in plan["clients"]}) > 1
    assert sum(c["examples"] for c in plan["clients"]) == cfg.data.max_train_examples and plan["privacy"]["epsilon"] <= 4
    assert cli.main(["run", *over]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = read_jsonl(run / "clients.jsonl")
    assert {c["client"]: sum(r["client"] == c["client"] for r in rows) for c in plan["clients"]} == {c["client"]: c["rounds"] for c in plan["clients"]}
    last = {r["client"]: r["epsilon"] for r in rows}  # each client's row of the last round it trained in
    assert last == pytest.approx({c["client"]: c["epsilon"] for c in plan["clients"]}, rel=1e-9)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["noise_multiplier"] == pytest.approx(plan["privacy"]["noise_multiplier"], rel=1e-12)
    assert summary["epsilon"] == pytest.approx(plan["privacy"]["epsilon"], rel=1e-9)


def test_the_client_dp_plan_is_the_accountants(tiny_models, tmp_path, capsys):
    """ε after each round: Opacus' RDP accountant asked directly (q = 0.5, z = 0.7, t steps), and the run's."""
    from opacus.accountants import RDPAccountant

    dp = dict(privacy__mode="client", fed__weighting="uniform", privacy__noise_multiplier=0.7, privacy__delta=1e-3)
    over = overrides(tiny_models["bert"], tmp_path, fed__method="ffa", partition__num_clients=6, fed__fraction=0.5, fed__rounds=3, **dp)
    plan = _plan(over, capsys)
    assert plan["privacy"]["sample_rate"] == 0.5 and plan["privacy"]["noise_multiplier"] == 0.7 and "rounds" not in plan["clients"][0]
    want = []
    for t in (1, 2, 3):
        accountant = RDPAccountant()
        accountant.history = [(0.7, 0.5, t)]
        want.append(accountant.get_epsilon(delta=1e-3))
    assert plan["privacy"]["epsilon_by_round"] == pytest.approx(want, rel=1e-9)
    assert cli.main(["run", *over]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert [r["epsilon"] for r in read_jsonl(run / "metrics.jsonl")] == pytest.approx(want, rel=1e-9)


def test_the_plan_in_words_and_its_refusals(tiny_models, tmp_path, capsys):
    over = overrides(tiny_models["bert"], tmp_path, fed__method="hexa")
    data = _plan(over, capsys)
    assert cli.main(["plan", *over]) == 0
    out = capsys.readouterr().out
    assert "hexa, 3 clients, 3 rounds, fraction 1" in out and "no differential privacy" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("client") and line[6:7].isdigit()]
    assert rows == [[c["client"], str(c["examples"]), "4", str(math.ceil(c["examples"] / 8)), "3"] for c in data["clients"]]
    assert cli.main(["plan", *over, "privacy.mode=local", "privacy.target_epsilon=0.001", "privacy.delta=1e-3"]) == 2
    assert "cannot be met" in capsys.readouterr().err
    assert cli.main(["plan", *over, "data.node_data=true", "data.label_names=[negative,positive]"]) == 2
    assert "data.node_data=true" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
