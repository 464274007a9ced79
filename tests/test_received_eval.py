"""Federated evaluation (``fed.received_eval``): each client scores the model it receives, before
training, on its held-out examples; after the last round the next round's clients score the final
model. Checked against the exported global model, loaded with peft as a user loads it and scored
one client at a time with a plain forward pass and numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from engine_support import overrides, read_jsonl, tiny_models  # noqa: F401

from fedlora import cli
from fedlora.config import ConfigError, load_config
from fedlora.engine import build_experiment, run_name


def _held_out_scores(model_dir, adapter_dir, exp) -> dict[str, dict[str, float]]:
    """client → accuracy of the exported model on its held-out examples, and their number."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    data = exp.train
    out = {}
    for client in exp.clients:
        logits, labels = [], []
        for i in client.held_out:
            a, b = int(data.offsets[i]), int(data.offsets[i + 1])
            kwargs = {"input_ids": data.ids[a:b][None]}
            if data.token_type_ids is not None:
                kwargs["token_type_ids"] = data.token_type_ids[a:b][None]
            with torch.no_grad():
                logits.append(model(**kwargs).logits[0].double().numpy())
            labels.append(int(data.labels[i]))
        logits, labels = np.array(logits), np.array(labels)
        out[client.client_id] = {"accuracy": float(np.mean(np.argmax(logits, axis=1) == labels)), "n": len(labels)}
    return out


def test_clients_score_the_global_model_they_receive(tiny_models, tmp_path):
    common = dict(fed__method="hexa", fed__personal_eval=0.3, fed__received_eval="true", partition__scheme="iid", data__max_train_examples=200, train__lr=2e-2)
    two = overrides(tiny_models["bert"], tmp_path / "two", fed__rounds=2, **common)
    one = overrides(tiny_models["bert"], tmp_path / "one", fed__rounds=1, **common)
    assert cli.main(["run", *two]) == 0 and cli.main(["run", *one]) == 0
    cfg_two, cfg_one = load_config(None, two), load_config(None, one)
    run_two, run_one = tmp_path / "two" / run_name(cfg_two), tmp_path / "one" / run_name(cfg_one)
    exp = build_experiment(cfg_one)
    # the global model after round 1, as exported, on each client's held-out examples
    want = _held_out_scores(tiny_models["bert"], run_one / "adapter", exp)
    total = sum(w["n"] for w in want.values())
    weighted = {"accuracy": sum(w["accuracy"] * w["n"] for w in want.values()) / total}
    # ... is what round 2's clients scored before training (each, and their weighted mean)
    clients = [c for c in read_jsonl(run_two / "clients.jsonl") if c["round"] == 2]
    # (Accuracy only: the tiny model's logits are nearly tied, and round-off breaks ties of the AUC's
    # ranking one way or the other; its argmax margins are far above round-off.)
    assert {c["client"]: c["received_accuracy"] for c in clients} == pytest.approx({cid: w["accuracy"] for cid, w in want.items()})
    assert read_jsonl(run_two / "metrics.jsonl")[1]["received_accuracy"] == pytest.approx(weighted["accuracy"])
    # (the models the clients trained from it score otherwise: the check above tells them apart)
    assert any(c["personal_accuracy"] != pytest.approx(c["received_accuracy"]) for c in clients)
    # ... and it is what the one-round run's final evaluation on the clients reports
    summary = json.loads((run_one / "summary.json").read_text())
    assert summary["received_final"]["accuracy"] == pytest.approx(weighted["accuracy"])
    assert set(summary["received_final"]) == {"accuracy", "roc_auc"}
    assert summary["received_final_clients"] == len(exp.clients)
    # Scoring before training leaves training alone: round 1 trains as without it.
    plain = overrides(tiny_models["bert"], tmp_path / "plain", fed__rounds=1, **{**common, "fed__received_eval": "false"})
    assert cli.main(["run", *plain]) == 0
    run_plain = tmp_path / "plain" / run_name(load_config(None, plain))
    a = torch.load(run_one / "checkpoint.pt", weights_only=True)["state"]["adapters"]
    b = torch.load(run_plain / "checkpoint.pt", weights_only=True)["state"]["adapters"]
    assert all(torch.equal(a[m][p], b[m][p]) for m in a for p in ("A", "B"))
    assert "received_final" not in json.loads((run_plain / "summary.json").read_text())


@pytest.mark.parametrize(
    "extra,words",
    [
        ({}, "fed.personal_eval > 0"),
        ({"fed.personal_eval": 0.2, "fed.method": "fedsa"}, "fedsa has no global model"),
    ],
)
def test_received_eval_without_a_global_model_to_score_is_refused(extra, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, ["fed.received_eval=true", *(f"{k}={v}" for k, v in extra.items())])


def test_a_dropped_clients_score_of_what_it_received_still_counts(tiny_models, tmp_path, monkeypatch):
    """The score is taken before training, so it does not depend on the update: a client whose update
    the server refuses (here: diverged) keeps its received_* in its row and in the round's mean."""
    import fedlora.engine.simulator as simulator
    from fedlora.core import Adapter, ClientUpdate
    from fedlora.engine.server import ClientResult

    real = simulator.Simulator.train

    def train(self, job, progress=None):
        res = real(self, job, progress)
        if job.client.client_id == "client1" and job.round == 2:
            u = res.update
            res = ClientResult(
                ClientUpdate(u.client_id, u.num_examples, {m: Adapter(a.B * 1e25, a.A, a.scale) for m, a in u.adapters.items()}, u.dense), res.stats
            )
        return res

    monkeypatch.setattr(simulator.Simulator, "train", train)
    over = overrides(
        tiny_models["bert"], tmp_path, fed__method="fedit", fed__rounds=2, fed__personal_eval=0.3, fed__received_eval="true", partition__scheme="iid"
    )
    assert cli.main(["run", *over]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    clients = [c for c in read_jsonl(run / "clients.jsonl") if c["round"] == 2]
    (dropped,) = [c for c in clients if "dropped" in c]
    assert dropped["client"] == "client1" and "received_accuracy" in dropped
    row = read_jsonl(run / "metrics.jsonl")[1]
    assert row["dropped"] == 1
    want = sum(c["received_accuracy"] * c["personal_n"] for c in clients) / sum(c["personal_n"] for c in clients)
    assert row["received_accuracy"] == pytest.approx(want)
    kept = [c for c in clients if "dropped" not in c]
    assert row["personal_accuracy"] == pytest.approx(sum(c["personal_accuracy"] * c["personal_n"] for c in kept) / sum(c["personal_n"] for c in kept))


def test_fedsa_trained_centrally_may_score_what_it_receives():
    """fed.mode=centralized trains one client with fedit whatever fed.method says: nothing to refuse."""
    load_config(None, ["fed.received_eval=true", "fed.personal_eval=0.2", "fed.method=fedsa", "fed.mode=centralized"])
