"""The engines drop a client whose update is refused or cannot be aggregated, with the reason,
and finish the round over the others; optional norm bounds drop outliers the same way."""

from __future__ import annotations

import pytest
import torch
from engine_support import overrides, read_jsonl, tiny_models  # noqa: F401

import fedlora.engine.simulator as simulator
from fedlora import cli
from fedlora.core import Adapter, ClientUpdate


def _poison(monkeypatch, victim: str, factor: float, rounds=(2,)):
    """Client ``victim`` sends its B times ``factor`` in the given rounds."""
    real = simulator.run_client

    def run_client(fm, start, client, *args, **kwargs):
        update, stats = real(fm, start, client, *args, **kwargs)
        if client.client_id == victim and run_client.round in rounds:
            update = ClientUpdate(
                update.client_id, update.num_examples, {m: Adapter(a.B * factor, a.A, a.scale) for m, a in update.adapters.items()}, update.dense
            )
        return update, stats

    run_client.round = 0
    real_plan = simulator.Simulator.plan

    def plan(self, state):
        run_client.round = state.round + 1
        return real_plan(self, state)

    monkeypatch.setattr(simulator, "run_client", run_client)
    monkeypatch.setattr(simulator.Simulator, "plan", plan)


@pytest.mark.parametrize("method", ["fedex", "fra", "hexa"])
def test_a_diverged_client_is_dropped_and_the_round_finishes(tiny_models, tmp_path, monkeypatch, method):
    _poison(monkeypatch, "client1", 1e25)
    assert cli.main(["run", *overrides(tiny_models["bert"], tmp_path, fed__method=method)]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows, clients = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "clients.jsonl")
    assert [r["clients"] for r in rows] == [3, 2, 3] and rows[1]["dropped"] == 1
    (dropped,) = [c for c in clients if "dropped" in c]
    assert dropped["client"] == "client1" and dropped["round"] == 2 and "diverged" in dropped["dropped"]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)


@pytest.mark.parametrize("setting,needle", [("fed.max_update_ratio=10", "max_update_ratio=10"), ("fed.max_update_norm=50", "max_update_norm=50")])
def test_norm_bounds_drop_an_outlier_with_the_reason(tiny_models, tmp_path, monkeypatch, setting, needle):
    _poison(monkeypatch, "client2", 1e3)
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedex", train__lr=5e-3) + [setting]
    assert cli.main(["run", *over]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    clients = read_jsonl(run / "clients.jsonl")
    dropped = [c for c in clients if "dropped" in c]
    assert [(c["client"], c["round"]) for c in dropped] == [("client2", 2)] and needle in dropped[0]["dropped"]


def test_bench_clients_reports_memory_and_time_per_round(tiny_models, capsys):
    argv = ["bench", "clients", f"model.name={tiny_models['bert']}", "model.max_length=64", "model.rank=4", "data.max_train_examples=400", "threads=1"]
    assert cli.main([*argv, "--clients", "4,40", "--per-round", "4", "--rounds", "2", "--steps", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r[0]) for r in rows] == [4, 40] and all(int(r[1]) == 4 for r in rows)
    mem = [float(r[2]) for r in rows]
    assert all(m > 100 for m in mem) and max(mem) / min(mem) < 1.5  # one base model, whatever the number of clients
