"""Flower engine, in this process: fedlora's real ServerApp engine, Strategy and
ClientApp over a Grid that delivers messages locally (tests/flower_support.py).

Equivalence is checked against the in-process engine run independently from
the same config; failures against what the core must do with the clients
that finished (weights renormalised over them, exactness over them).
"""

from __future__ import annotations

import logging
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_support import GLUE, overrides, tiny_models  # noqa: F401  (fixture)
from flower_support import LocalGrid
from flwr.app import Array, ArrayRecord, Message

from fedlora.config import ConfigError, RunConfig, load_config
from fedlora.core import Adapter, ClientStart, ClientUpdate, Factored
from fedlora.engine import Server, Simulator, build_experiment
from fedlora.engine.server import RoundFailed
from fedlora.flower import client_app as client_module
from fedlora.flower.records import MalformedRecord, decode_start, decode_update, encode_broadcast, encode_start, encode_update
from fedlora.flower.run_config import config_from_run_config, run_config_entries
from fedlora.flower.server_app import discover_nodes, flower_engine

ROOT = Path(__file__).resolve().parents[1]


def flower_run_config(cfg_overrides: list[str]) -> dict:
    """Flower's flat run config for the same settings as ``cfg_overrides``."""
    return run_config_entries(load_config(None, cfg_overrides))


def run_flower(cfg_overrides, tmp_path, **grid_kw):
    run_config = flower_run_config(cfg_overrides)
    cfg = config_from_run_config(run_config)
    (tmp_path / "flower").mkdir()
    server = Server(build_experiment(cfg), tmp_path / "flower")
    grid = LocalGrid(client_module.app, run_config, cfg.partition.num_clients, **grid_kw)
    state = flower_engine(grid)(server, server.initial_state())
    return server, state, grid


def run_in_process(cfg_overrides, tmp_path):
    (tmp_path / "inproc").mkdir()
    sim = Simulator(build_experiment(load_config(None, cfg_overrides)), tmp_path / "inproc")
    return sim, sim.run()


# ------------------------------------------------------------------- records
def test_records_round_trip_as_float32_arrays():
    g = torch.Generator().manual_seed(0)
    start = ClientStart(
        adapters={"l.q": Adapter(torch.randn(6, 2, generator=g).bfloat16(), torch.randn(2, 5, generator=g).bfloat16(), 0.5)},
        base_delta={"l.q": Factored(torch.randn(6, 3, generator=g), torch.randn(3, 5, generator=g))},
        dense={"head.w": torch.randn(2, 6, generator=g).half()},
        train_A=False,
    )
    back, job = decode_start(encode_start(start, round=3, partition_id=1, rank=2, seed=42, send_label_counts=True))
    assert job == {
        "round": 3,
        "partition-id": 1,
        "rank": 2,
        "seed": 42,
        "train-a": False,
        "train-b": True,
        "train-core": False,
        "keep-local": "",
        "send-label-counts": True,
        "since": 0,
    }
    a = back.adapters["l.q"]
    assert a.B.dtype == a.A.dtype == back.dense["head.w"].dtype == torch.float32  # bf16/fp16 cast, not refused
    assert torch.equal(a.B, start.adapters["l.q"].B.float()) and a.scale == 0.5 and back.train_A is False
    assert torch.equal(back.base_delta["l.q"].L, start.base_delta["l.q"].L)

    update = ClientUpdate(
        "client1",
        17,
        {"l.q": Adapter(torch.ones(6, 2), torch.ones(2, 5), 0.5)},
        {"head.w": torch.zeros(2, 6)},
        label_counts=torch.tensor([10.0, 7.0], dtype=torch.float64),
    )
    content = encode_update(update, {"loss": 0.5, "steps": 3, "examples": 17, "tokens": 99}, partition_id=1)
    got, stats = decode_update(content, "client1")
    assert got.num_examples == 17 and torch.equal(got.label_counts, update.label_counts) and stats["tokens"] == 99
    del content["fedlora.adapters"]
    with pytest.raises(MalformedRecord, match="fedlora.adapters"):
        decode_update(content, "client1")


def test_empty_factors_travel_in_bfloat16():
    """A rank-0 factor (an exactly zero residual compresses to one) sent in bf16: torch.frombuffer
    refuses empty buffers, which failed every node of the round; and an odd byte count is refused."""
    from fedlora.flower.records import _arrays, _tensor

    record = _arrays({"m/L": torch.zeros(6, 0), "m/R": torch.zeros(0, 5)}, torch.bfloat16)
    assert [tuple(_tensor(record[k]).shape) for k in ("m/L", "m/R")] == [(6, 0), (0, 5)]
    odd = _arrays({"x": torch.ones(3)}, torch.bfloat16)["x"]
    odd.data = odd.data[:-1]
    with pytest.raises(MalformedRecord, match="not whole numbers"):
        _tensor(odd)


# ---------------------------------------------------------------- run config
def test_pyproject_lists_every_fedlora_key_with_a_valid_value():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    flat = {}
    for k, v in listed.items():
        flat.update({f"{k}.{kk}": vv for kk, vv in v.items()} if isinstance(v, dict) else {k: v})
    assert set(flat) == set(run_config_entries())
    cfg = config_from_run_config(flat)
    assert isinstance(cfg, RunConfig) and cfg.model.target_modules == []  # the architecture's default
    with pytest.raises(ConfigError, match="fed.methd"):
        config_from_run_config({**flat, "fed.methd": "fedex"})
    with pytest.raises(ConfigError, match="model.rank"):
        config_from_run_config({**flat, "model.rank": "eight"})


def test_uv_never_installs_a_torch_of_its_own():
    """Flower's runtime dependency installation runs `uv sync` on this pyproject: uv's override
    gives torch a marker that no platform satisfies, so uv leaves the installed torch alone."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    overrides = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["override-dependencies"]
    (torch_req,) = [Requirement(r) for r in overrides if Requirement(r).name == "torch"]
    assert torch_req.marker is not None
    for platform in ("linux", "darwin", "win32"):
        for machine in ("x86_64", "aarch64", "arm64", "AMD64"):
            env = {**default_environment(), "sys_platform": platform, "platform_machine": machine}
            assert not torch_req.marker.evaluate(env)


def test_run_config_round_trips_lists_and_options():
    cfg = load_config(None, ["model.client_ranks=[2,4,8]", "fed.options={restart: svd_sqrt, drift_beta: 0.5}", "model.target_modules=[query,key,value]"])
    assert config_from_run_config(run_config_entries(cfg)) == cfg


# --------------------------------------------------------------- equivalence
@pytest.mark.parametrize(
    "method,extra",
    [
        ("fedex", ["fed.fraction=0.67"]),
        ("fedex", ["fed.fraction=0.67", "fed.transport=bfloat16"]),  # bf16 on the wire, catching up on base deltas
        ("hexa", ["model.client_ranks=[2,4,4]"]),
        ("hexa", ["model.client_ranks=[2,4,4]", "fed.fraction=0.67", "fed.options={server_momentum: 0.5}"]),  # μ·v in W0's delta: nodes catch up on it
        ("fedex", ["fed.fraction=0.67", "model.base_delta=factored"]),
        ("fedex", ["fed.fraction=0.67", "privacy.mode=client", "fed.weighting=uniform", "privacy.noise_multiplier=0.3", "privacy.delta=1e-3"]),
        ("hexa", ["privacy.mode=local", "privacy.noise_multiplier=1.0", "privacy.delta=1e-3"]),
        ("rolora", []),  # B-rounds and A-rounds: the frozen factor must stay frozen on the node
        ("fedsvd", []),
        (
            "fedsvd",
            ["fed.fraction=0.67", "privacy.mode=client", "fed.weighting=uniform", "privacy.noise_multiplier=0.3", "privacy.delta=1e-3"],
        ),  # its SVD after the noise
        ("fedsb", []),  # round 1 fixes the frames, then nodes train only R inside them (a refused update would drop)
        ("fedsb", ["fed.fraction=0.67", "privacy.mode=client", "fed.weighting=uniform", "privacy.noise_multiplier=0.3", "privacy.delta=1e-3"]),
        ("fedsa", ["fed.personal_eval=0.25"]),  # B and head kept on the node (context.state), personal metrics
        ("fedex", ["fed.fraction=0.67", "fed.personal_eval=0.25", "fed.received_eval=true"]),  # nodes score what they receive
    ],
    ids=[
        "fedex",
        "fedex-bf16",
        "hexa",
        "hexa-momentum",
        "fedex-factored",
        "fedex-client-dp",
        "hexa-local-dp",
        "rolora",
        "fedsvd",
        "fedsvd-client-dp",
        "fedsb",
        "fedsb-client-dp",
        "fedsa-personal",
        "fedex-received-eval",
    ],
)
def test_flower_equals_in_process(tiny_models, tmp_path, method, extra):
    """Same seed → the same global adapters, heads and metrics as the in-process engine.
    fedex with sampling: nodes skip rounds and must catch up on several base deltas."""
    over = overrides(tiny_models["bert"], tmp_path, fed__method=method) + extra
    sim, want = run_in_process(over, tmp_path)
    server, got, grid = run_flower(over, tmp_path)
    assert got.round == want.round == 3
    # A node sums the base deltas it is sent (one compressed sum) where the in-process model
    # folds them round by round: with factored or full-rank (DP) base deltas the round-off
    # differs a little more.
    atol = 3e-5 if {"model.base_delta=factored", "privacy.mode=client"} & set(extra) else 1e-5
    # bf16 transport: a 1e-7 difference in a trained value can round to the next bf16 number (2⁻⁸ apart)
    rtol = 2**-7 if "fed.transport=bfloat16" in extra else 1e-4
    if method == "fedsa":  # each node's own model, scored on its own held-out examples, reached the server
        assert [r["personal_accuracy"] for r in server.rounds] == pytest.approx([r["personal_accuracy"] for r in sim.rounds], abs=1e-6)
    if "fed.received_eval=true" in extra:  # before training, each round; after the last, in evaluate messages
        keys = [k for k in sim.rounds[-1] if k.startswith("received_")]
        assert keys and all([r[k] for r in server.rounds] == pytest.approx([r[k] for r in sim.rounds], abs=1e-6) for k in keys)
        assert server.received_final == pytest.approx(sim.received_final, abs=1e-6) and sim.received_final_clients == 2
        evaluated = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
        assert len(evaluated) == sim.received_final_clients
    if any("server_momentum" in e for e in extra):  # the momentum buffer was kept and applied on both sides
        assert all(r["momentum_norm"] > 0 for r in sim.rounds + server.rounds)
    if "privacy.mode=local" in extra:  # every client's ε reached the server through Flower's metric records
        assert [r["epsilon"] for r in server.rounds] == [r["epsilon"] for r in sim.rounds] and server.rounds[-1]["epsilon"] > 0
    for name, a in want.adapters.items():
        torch.testing.assert_close(got.adapters[name].B, a.B, atol=atol, rtol=rtol)
        torch.testing.assert_close(got.adapters[name].A, a.A, atol=atol, rtol=rtol)
    for name, t in want.dense.items():
        torch.testing.assert_close(got.dense[name], t, atol=atol, rtol=rtol)
    assert all(r["dropped"] == 0 for r in sim.rounds + server.rounds), "every client's update was accepted (frozen factors stayed frozen)"
    for w, g in zip(sim.rounds, server.rounds, strict=True):
        assert g["clients"] == w["clients"] and g["bytes_up"] == w["bytes_up"] and g["train_tokens"] == w["train_tokens"]
        assert g["eval_accuracy"] == w["eval_accuracy"]
        assert math.isclose(g["train_loss"], w["train_loss"], rel_tol=1e-4)
    # every train message carried its client's own rank
    ranks = {
        m.content.config_records["fedlora.job"]["partition-id"]: m.content.config_records["fedlora.job"]["rank"]
        for m in grid.sent
        if m.metadata.message_type == "train"
    }
    assert ranks and all(rank == server.exp.clients[pid].rank for pid, rank in ranks.items())


# ------------------------------------------------------------------ failures
def test_failed_and_slow_clients_are_dropped_and_the_round_stays_exact(tiny_models, tmp_path, monkeypatch, caplog):
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedex", fed__rounds=2, fed__client_timeout=0.5)
    real = client_module.run_client

    def flaky(fm, start, client, *a, **kw):
        if client.client_id == "client1":
            raise RuntimeError("disk full")
        return real(fm, start, client, *a, **kw)

    monkeypatch.setattr(client_module, "run_client", flaky)
    seen = []  # (updates, new state) of every aggregation
    from fedlora.core.methods.fedex import FedEx

    real_aggregate = FedEx.aggregate

    def spy(self, state, updates):
        new = real_aggregate(self, state, updates)
        seen.append((list(updates), new))
        return new

    monkeypatch.setattr(FedEx, "aggregate", spy)
    slow_node = 1000 + 7 * 2  # LocalGrid's id for partition 2
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        server, state, _ = run_flower(over, tmp_path, slow={slow_node})
    text = caplog.text
    assert "client1 dropped: node 1007 failed: RuntimeError: disk full" in text
    assert f"client2 dropped: no reply from node {slow_node}" in text
    for row in server.rounds:
        assert row["clients"] == 1 and row["dropped"] == 2
    # Exact over the client that finished (dense float64): ΔW0_t + s·B̄_t·Ā_t = s·B_0·A_0.
    assert len(seen) == 2
    for updates, new in seen:
        assert [u.client_id for u in updates] == ["client0"]
        (u,) = updates
        for name, a in u.adapters.items():
            want = a.scale * a.B.double() @ a.A.double()
            g = new.adapters[name]
            got = new.base_delta[name].L.double() @ new.base_delta[name].R.double() + g.scale * g.B.double() @ g.A.double()
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert list(state.info["clients"]) == ["client0"] and state.info["weights"] == [1.0]
    dropped = [r for r in server.client_rows if "dropped" in r]
    assert {r["client"] for r in dropped} == {"client1", "client2"}


def test_a_round_with_no_finished_client_fails_loudly(tiny_models, tmp_path):
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedit", fed__rounds=1, partition__num_clients=2, fed__client_timeout=0.5)
    with pytest.raises(RoundFailed, match="no sampled client finished"):
        run_flower(over, tmp_path, slow={1000, 1007})


def test_a_bad_update_is_dropped_with_the_reason(tiny_models, tmp_path, monkeypatch, caplog):
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedit", fed__rounds=1)
    real = client_module.encode_update

    def poisoned(update, stats, pid, *wire):
        if pid == 0:
            name = next(iter(update.adapters))
            a = update.adapters[name]
            update = ClientUpdate(update.client_id, update.num_examples, {**update.adapters, name: Adapter(a.B * float("nan"), a.A, a.scale)}, update.dense)
        return real(update, stats, pid, *wire)

    monkeypatch.setattr(client_module, "encode_update", poisoned)
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        server, state, _ = run_flower(over, tmp_path)
    assert "client0 dropped: node 1000 sent a bad update" in caplog.text and "B contains NaN" in caplog.text
    assert server.rounds[0]["clients"] == 2 and sorted(state.info["clients"]) == ["client1", "client2"]


def _set_scale_text(content):
    scales = content.config_records["fedlora.scales"]
    scales[next(iter(scales))] = "half"


def _set_steps_nan(content):
    content.metric_records["fedlora.metrics"]["steps"] = float("nan")


def _drop_counts(content):
    content["fedlora.label-counts"] = ArrayRecord({"other": Array(np.zeros(2, dtype=np.float32))})


def _set_rate(content):
    content.metric_records["fedlora.metrics"]["sample_rate"] = 3.0


@pytest.mark.parametrize(
    "poison,needle",
    [
        (_set_scale_text, "cannot be read (ValueError"),
        (_set_steps_nan, "steps must be a whole number ≥ 1, got nan"),
        (_drop_counts, "must hold one array 'counts'"),
        (_set_rate, "sample_rate = 3.0 must be in (0, 1]"),
    ],
    ids=["scale-text", "steps-nan", "counts-missing", "rate-out-of-range"],
)
def test_a_reply_that_cannot_be_read_drops_that_client_not_the_run(tiny_models, tmp_path, monkeypatch, caplog, poison, needle):
    """Replies are a remote party's bytes: a scale that is not a number, a count that is not an integer,
    a label-count record without its array, a sampling rate no Poisson batch has. Each drops its client
    with the reason (they escaped as a traceback that ended the ServerApp) and the round goes on."""
    over = overrides(tiny_models["bert"], tmp_path, fed__method="hexa", fed__rounds=1, fed__options="{class_aware_head: true}")
    real = client_module.encode_update

    def poisoned(update, stats, pid, *wire):
        content = real(update, stats, pid, *wire)
        if pid == 0:
            poison(content)
        return content

    monkeypatch.setattr(client_module, "encode_update", poisoned)
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        server, state, _ = run_flower(over, tmp_path)
    assert "client0 dropped: node 1000 sent" in caplog.text and needle in caplog.text, caplog.text[-2000:]
    assert server.rounds[0]["clients"] == 2 and sorted(state.info["clients"]) == ["client1", "client2"]


def test_in_bf16_every_node_folds_the_very_delta_the_server_folded(tiny_models, tmp_path, monkeypatch):
    """fedex with bf16 transport: round 1's base delta is bf16-exact on the server. Round 2 sent it as the
    server's folded sum (its SVD, not bf16 values) rounded to bf16: each node held another ΔW0 (2.4e-3 off);
    now the round's delta itself travels, and what a node holds equals it bit for bit."""
    import fedlora.flower.strategy as strategy

    seen = {}
    real = strategy.FedLoraStrategy.aggregate_train

    def spy(self, server_round, replies):
        out = real(self, server_round, replies)
        if server_round == 1:
            seen.update({k: f.dense(torch.float64) for k, f in self.state.base_delta.items()})
        return out

    monkeypatch.setattr(strategy.FedLoraStrategy, "aggregate_train", spy)
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedex", fed__rounds=2, fed__transport="bfloat16")
    _, _, grid = run_flower(over, tmp_path)
    assert seen
    for node in grid.contexts:
        held = grid.contexts[node].state["fedlora.base"].to_torch_state_dict()
        for k, want in seen.items():
            got = held[k + "/L"].double() @ held[k + "/R"].double()
            assert float((got - want).norm()) <= 1e-6 * float(want.norm()), (node, k)


def test_the_server_keeps_only_the_base_deltas_a_node_still_lacks(tiny_models, tmp_path, monkeypatch):
    """Every node replies every round: after round t each has folded rounds 1..t−1, so the history
    holds round t alone (it kept every round's delta for the whole run). A node then restarted
    without its sum is sent the snapshot of every round, and the run still equals the in-process one."""
    import fedlora.flower.strategy as strategy

    sizes = []
    real = strategy.FedLoraStrategy.aggregate_train

    def spy(self, server_round, replies):
        out = real(self, server_round, replies)
        sizes.append(sorted(self.history))
        if server_round == 2:  # node 1007 loses what it folded, as a restart would
            held = self._grid.contexts[1007].state
            for key in ("fedlora.base", "fedlora.sync"):
                if key in held:
                    del held[key]
        return out

    monkeypatch.setattr(strategy.FedLoraStrategy, "aggregate_train", spy)
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedex", fed__rounds=4)
    _, want = run_in_process(over, tmp_path)
    _, got, _ = run_flower(over, tmp_path)
    assert sizes == [[(1, 1)], [(2, 2)], [(3, 3)], [(4, 4)]]
    for name, a in want.adapters.items():
        torch.testing.assert_close(got.adapters[name].B, a.B, atol=3e-5, rtol=1e-4)
        torch.testing.assert_close(got.adapters[name].A, a.A, atol=3e-5, rtol=1e-4)


def test_with_client_sampling_the_history_stays_within_the_snapshots_size(tiny_models, tmp_path, monkeypatch):
    """Two of four clients a round: a node can go unsampled for rounds, and the history used to grow back to the
    least recently synced node. Now once the kept rounds' bytes exceed the snapshot's (Σ_t ΔW0_t in
    float32) the oldest go; a node behind them is sent the snapshot, and the run still equals the
    in-process one."""
    import fedlora.flower.strategy as strategy

    seen = []
    real = strategy.FedLoraStrategy.aggregate_train

    def spy(self, server_round, replies):
        out = real(self, server_round, replies)
        held = 4 * sum(f.numel() for d in self.history.values() for f in d.values())
        snapshot = 4 * sum(f.numel() for f in self.server.folded.values())
        floor = min(self.synced.get(node, 0) for node in self.nodes.values())
        seen.append((server_round, held, snapshot, self.pruned, floor))
        return out

    monkeypatch.setattr(strategy.FedLoraStrategy, "aggregate_train", spy)
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedex", fed__rounds=6, fed__fraction=0.5, partition__num_clients=4, model__rank=8)
    sim, want = run_in_process(over, tmp_path)
    server, got, _ = run_flower(over, tmp_path)
    assert [r["clients"] for r in sim.rounds] == [2] * 6
    assert all(held <= snapshot for t, held, snapshot, _, _ in seen if t >= 2), seen
    assert any(pruned > floor for *_, pruned, floor in seen), f"no round was pruned by size: the check has no power {seen}"
    assert [r["eval_accuracy"] for r in server.rounds] == pytest.approx([r["eval_accuracy"] for r in sim.rounds], abs=1e-6)
    for name, a in want.adapters.items():
        torch.testing.assert_close(got.adapters[name].B, a.B, atol=3e-5, rtol=1e-4)
        torch.testing.assert_close(got.adapters[name].A, a.A, atol=3e-5, rtol=1e-4)


def test_hetlora_self_pruning_lowers_ranks_alike_in_both_engines(tiny_models, tmp_path):
    """HetLoRA with rank self-pruning (γ = 0.5, a strong λ so that the tail shrinks within four rounds):
    a client whose tail shrank sends a lower-rank adapter and trains at that rank from then on, never
    higher; the Flower nodes (asked for a rank below their configured one) do the same as the
    in-process engine: the same ranks round by round and the same global adapters."""
    over = overrides(tiny_models["bert"], tmp_path, fed__method="hetlora", fed__rounds=4, model__client_ranks="[4,4,2]")
    over += ["fed.options={prune_gamma: 0.5, prune_strength: 20.0}"]
    sim, want = run_in_process(over, tmp_path)
    server, got, _ = run_flower(over, tmp_path)
    ranks = {}
    for r in sim.client_rows:
        ranks.setdefault(r["client"], []).append(r["rank"])
    assert all(a >= b for seq in ranks.values() for a, b in zip(seq, seq[1:])), ranks
    assert any(seq[-1] < seq[0] for seq in ranks.values()), f"no client pruned: the check has no power {ranks}"
    assert want.extra["ranks"] == got.extra["ranks"] and min(want.extra["ranks"].values()) < 2
    assert [(r["client"], r["rank"]) for r in server.client_rows] == [(r["client"], r["rank"]) for r in sim.client_rows]
    for name, a in want.adapters.items():
        torch.testing.assert_close(got.adapters[name].B, a.B, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.adapters[name].A, a.A, atol=1e-5, rtol=1e-4)


def test_hetlora_self_pruning_is_refused_under_dp(tiny_models, tmp_path):
    over = overrides(tiny_models["bert"], tmp_path, fed__method="hetlora", privacy__mode="local", privacy__noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="prune_gamma > 0 reports each client's rank"):
        build_experiment(load_config(None, [*over, "fed.options={prune_gamma: 0.5}"]))


def test_rounds_without_a_base_delta_need_no_resync(tiny_models, tmp_path, caplog):
    """HEXA without the fold and with server momentum sends no base delta in round 1. A node held
    itself as having folded through round 0 while the server held it through round 1, so in round 3
    every node asked to be resynchronised (the round's download doubled); now the job says what the
    server assumes, and a node that has folded it holds every earlier round."""
    over = overrides(tiny_models["bert"], tmp_path, fed__method="hexa", fed__rounds=3, fed__options="{fold_residual: false, server_momentum: 0.5}")
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        server, _, _ = run_flower(over, tmp_path)
    assert [r["clients"] for r in server.rounds] == [3, 3, 3]
    assert "has folded only through" not in caplog.text


def test_a_node_that_asks_for_resync_again_is_dropped_not_resent_forever(tiny_models, tmp_path, monkeypatch, caplog):
    """A node that answers "resync" to its resend too (it cannot fold what it is sent) is dropped
    after one resend; before, every answer got a new message with a new timeout and the round never ended."""
    real = client_module._sync_base

    def stuck(content, context, job):
        if int(job["partition-id"]) == 1:
            raise client_module._Gap(0)
        return real(content, context, job)

    monkeypatch.setattr(client_module, "_sync_base", stuck)
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedex", fed__rounds=2)
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        server, state, _ = run_flower(over, tmp_path)
    assert [r["clients"] for r in server.rounds] == [2, 2]
    assert caplog.text.count("(partition 1) has folded only through round 0") == 2  # one resend a round
    assert "client1 dropped: node 1007 could not fold the base deltas it was sent" in caplog.text


def test_node_roll_call_errors(tiny_models, tmp_path):
    over = overrides(tiny_models["bert"], tmp_path)
    run_config = flower_run_config(over)
    grid = LocalGrid(client_module.app, run_config, 3)
    assert discover_nodes(grid, 3, timeout=1) == {0: 1000, 1: 1007, 2: 1014}
    grid.contexts[1007].node_config["partition-id"] = 0
    with pytest.raises(ConfigError, match="partition 0 is held by two nodes"):
        discover_nodes(grid, 3, timeout=1)
    with pytest.raises(ConfigError, match="only 3 of 4 nodes connected"):
        discover_nodes(grid, 4, timeout=0.01, poll_s=0.005)
    grid = LocalGrid(client_module.app, run_config, 3)
    with pytest.raises(ConfigError, match="holds partition 0 of 3; the run has partition.num_clients=2"):
        discover_nodes(grid, 2, timeout=1)
    grid = LocalGrid(client_module.app, run_config, 3)
    grid.contexts[1007].node_config["data"] = str(tmp_path / "no-such-hospital")
    with pytest.raises(ConfigError, match="node 1007: its node config names data=.*no-such-hospital.*does not exist on that machine"):
        discover_nodes(grid, 3, timeout=1)


def test_a_node_too_many_does_not_stop_a_run_whose_partitions_are_all_held(tiny_models, tmp_path, caplog):
    """Four nodes for three partitions, the fourth claiming partition 0 again (a SuperNode restarted
    under a new id while its stale one is still listed, say): the run starts with the first three and
    says why the fourth is left out; it aborted."""
    grid = LocalGrid(client_module.app, flower_run_config(overrides(tiny_models["bert"], tmp_path)), 4)
    for ctx in grid.contexts.values():
        ctx.node_config["num-partitions"] = 3
    extra = sorted(grid.contexts)[-1]
    grid.contexts[extra].node_config["partition-id"] = 0
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        claims = discover_nodes(grid, 3, timeout=1)
    assert sorted(claims) == [0, 1, 2] and extra not in claims.values()
    assert "partition 0 is held by two nodes" in caplog.text and "the run goes on without it" in caplog.text


def test_client_refuses_a_job_for_another_partition(tiny_models, tmp_path):
    over = overrides(tiny_models["bert"], tmp_path)
    run_config = flower_run_config(over)
    cfg = config_from_run_config(run_config)
    server = Server(build_experiment(cfg), tmp_path / "x")
    job = server.plan(server.initial_state())[0]
    grid = LocalGrid(client_module.app, run_config, 3)
    content = encode_start(job.start, round=1, partition_id=2, rank=job.client.rank, seed=job.seed, send_label_counts=False)
    encode_broadcast(content, {})
    reply = grid.send_and_receive([Message(content=content, dst_node_id=1000, message_type="train")])[0]
    assert reply.has_error() and "job for partition 2 reached the node holding partition 0" in reply.error.reason


# -------------------------------------------------------------------- resume
def test_server_killed_then_resumed_with_fresh_nodes_equals_uninterrupted(tiny_models, tmp_path, monkeypatch):
    """The ServerApp dies after round 2's checkpoint; a new one resumes on new nodes (empty
    context.state): they get one snapshot of every base delta folded so far, then per-round
    deltas again. fedex, so there is a base delta every round."""
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedex", fed__fraction=0.67)
    sim, want = run_in_process(over, tmp_path)

    class Killed(RuntimeError):
        pass

    original = Server.checkpoint

    def checkpoint_then_die(self, state):
        original(self, state)
        if state.round == 2:
            raise Killed

    run_config = flower_run_config(over)
    cfg = config_from_run_config(run_config)
    (tmp_path / "flower").mkdir()
    with monkeypatch.context() as mp:
        mp.setattr(Server, "checkpoint", checkpoint_then_die)
        server = Server(build_experiment(cfg), tmp_path / "flower")
        with pytest.raises(Killed):
            flower_engine(LocalGrid(client_module.app, run_config, 3))(server, server.initial_state())
    client_module._CACHE.clear()  # a new process on every node, too
    server = Server(build_experiment(cfg), tmp_path / "flower")
    state = server.resume_or_init()
    assert state.round == 2
    grid = LocalGrid(client_module.app, run_config, 3, node_ids=[2000, 2001, 2002])
    got = flower_engine(grid)(server, state)
    assert got.round == 3
    for name, a in want.adapters.items():
        torch.testing.assert_close(got.adapters[name].B, a.B, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.adapters[name].A, a.A, atol=1e-5, rtol=1e-4)
    assert server.rounds[-1]["eval_accuracy"] == sim.rounds[-1]["eval_accuracy"]
    spans = {k.split("/")[0] for m in grid.sent if m.metadata.message_type == "train" for k in m.content["fedlora.broadcast"].keys()}
    assert spans == {"1-2"}  # the snapshot of rounds 1-2, folded by each resumed node


@pytest.mark.parametrize(
    "setting,nodes,message",
    [
        ({"fed__mode": "centralized"}, 3, "fedlora: error: fed.mode='centralized' trains in one process: use `fedlora run`"),
        ({"partition__num_clients": 2}, 3, "fedlora: error: node 1000 holds partition 0 of 3; the run has partition.num_clients=2"),
        ({"fed__method": "fedavgg"}, 3, "fedlora: error: unknown aggregation method 'fedavgg'"),
        ({"fed__client_timeout": 0.01}, 2, "fedlora: error: only 2 of 3 nodes connected"),
    ],
    ids=["centralized", "partition-count", "unknown-method", "missing-nodes"],
)
def test_server_app_refuses_bad_input_in_one_line_and_writes_nothing(tiny_models, tmp_path, caplog, setting, nodes, message):
    from flwr.app import Context, RecordDict

    from fedlora.flower.server_app import FedLoraRunError, main

    try:
        run_config = flower_run_config(overrides(tiny_models["bert"], tmp_path, **setting))
    except ConfigError as e:  # refused by fedlora's config loader already; Flower passes the raw value
        assert message.removeprefix("fedlora: error: ") in str(e)
        run_config = {**flower_run_config(overrides(tiny_models["bert"], tmp_path)), **{k.replace("__", "."): v for k, v in setting.items()}}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with caplog.at_level(logging.ERROR, logger="fedlora"), pytest.raises(FedLoraRunError) as info:
        main(LocalGrid(client_module.app, run_config, nodes), context)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback
    assert info.value.exit_code != 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [str(info.value).removeprefix("fedlora: ")]
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # no run folder, not even an empty one


# ------------------------------------------------------- nodes that die and come back
def _restart_after_round(monkeypatch, grid_holder: dict, after: int, node: int, new_id: int | None, old_online: bool = False):
    """After round ``after``'s checkpoint, node ``node`` restarts with empty state (as ``new_id``)."""
    original = Server.checkpoint

    def checkpoint_then_restart(self, state):
        original(self, state)
        if state.round == after:
            grid_holder["grid"].restart(node, new_id, old_stays_online=old_online)

    monkeypatch.setattr(Server, "checkpoint", checkpoint_then_restart)


@pytest.mark.parametrize("new_id,old_online", [(None, False), (5000, False), (5000, True)], ids=["same-id", "new-id", "new-id-old-still-listed"])
def test_a_restarted_node_rejoins_and_the_run_equals_an_uninterrupted_one(tiny_models, tmp_path, monkeypatch, caplog, new_id, old_online):
    """A SuperNode restarts between rounds 2 and 3 and loses its context.state (its sum of
    base deltas; the server believes it holds round 1's). With the same id (authenticated nodes) it asks to be resynchronised and gets
    every base delta since round 0 within the round; with a new id it claims its partition.
    Either way no client is dropped and the run equals the in-process one. A replaced node
    that the SuperLink still lists (crashed, not yet marked offline) is never asked again."""
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedex")
    sim, want = run_in_process(over, tmp_path)
    run_config = flower_run_config(over)
    cfg = config_from_run_config(run_config)
    (tmp_path / "flower").mkdir()
    server = Server(build_experiment(cfg), tmp_path / "flower")
    grid = LocalGrid(client_module.app, run_config, 3)
    _restart_after_round(monkeypatch, {"grid": grid}, 2, 1007, new_id, old_online)
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        got = flower_engine(grid)(server, server.initial_state())
    assert [r["clients"] for r in server.rounds] == [3, 3, 3] and all(r["dropped"] == 0 for r in server.rounds)
    for name, a in want.adapters.items():
        torch.testing.assert_close(got.adapters[name].B, a.B, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.adapters[name].A, a.A, atol=1e-5, rtol=1e-4)
    assert [r["eval_accuracy"] for r in server.rounds] == [r["eval_accuracy"] for r in sim.rounds]
    if new_id is None:
        assert "node 1007 (partition 1) has folded only through round 0" in caplog.text
        resent = [m for m in grid.sent if m.metadata.dst_node_id == 1007 and m.metadata.message_type == "train"]
        assert len(resent) == 4  # rounds 1, 2, 3 (answered "resync": it lacks round 1), 3 again with everything
    else:
        takeover = "replaces node 1007, which still looks online" if old_online else "joins in place of node 1007"
        assert f"partition 1: node {new_id}" in caplog.text and takeover in caplog.text
        queries_to_old = [m for m in grid.sent if m.metadata.dst_node_id == 1007 and m.metadata.message_type == "query"]
        assert len(queries_to_old) == 1  # the first roll-call only


def test_a_node_that_dies_is_dropped_with_the_superlinks_reason(tiny_models, tmp_path, monkeypatch, caplog):
    """The SuperLink answers for a node that went offline (its reply comes from node 0, not the
    node): the reply is matched by the message it answers and its reason recorded."""
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedex", fed__rounds=2)
    run_config = flower_run_config(over)
    cfg = config_from_run_config(run_config)
    (tmp_path / "flower").mkdir()
    server = Server(build_experiment(cfg), tmp_path / "flower")
    grid = LocalGrid(client_module.app, run_config, 3)
    real_push = grid.push_messages

    def die_during_round_2(messages):
        messages = list(messages)
        if any(m.content.config_records["fedlora.job"]["round"] == 2 for m in messages if m.metadata.message_type == "train"):
            grid.contexts.pop(1014)  # the node dies once the round's messages are out
        return real_push(messages)

    monkeypatch.setattr(grid, "push_messages", die_during_round_2)
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        flower_engine(grid)(server, server.initial_state())
    assert "client2 dropped: node 1014 failed: Error: Node Unavailable" in caplog.text
    assert [r["clients"] for r in server.rounds] == [3, 2]


def test_a_node_trains_on_its_own_examples(tiny_models, tmp_path):
    """node_config data=<folder in the GLUE layout>: the node trains on all its own rows
    (not partition i of the run's set) and the server weights it by their count."""
    rows = (GLUE / "SST-2" / "train.tsv").read_text().splitlines()
    own = tmp_path / "hospital" / "SST-2"
    own.mkdir(parents=True)
    (own / "train.tsv").write_text("\n".join(rows[:1] + rows[-13:]) + "\n")  # header + 13 examples
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedex", fed__rounds=1)
    run_config = flower_run_config(over)
    cfg = config_from_run_config(run_config)
    (tmp_path / "flower").mkdir()
    server = Server(build_experiment(cfg), tmp_path / "flower")
    grid = LocalGrid(client_module.app, run_config, 3)
    grid.contexts[1007].node_config["data"] = str(tmp_path / "hospital")
    state = flower_engine(grid)(server, server.initial_state())
    examples = {r["client"]: r["examples"] for r in server.client_rows}
    assert examples["client1"] == 13
    assert examples["client0"] == len(server.exp.clients[0].indices)
    n = [examples[c] for c in state.info["clients"]]
    assert state.info["weights"] == pytest.approx([k / sum(n) for k in n])


def _hospitals(tmp_path: Path, sizes: list[int]) -> list[Path]:
    """Folders in the GLUE layout, each with its own rows of SST-2's training file."""
    rows = (GLUE / "SST-2" / "train.tsv").read_text().splitlines()
    out, start = [], 1
    for i, n in enumerate(sizes):
        (tmp_path / f"hospital{i}" / "SST-2").mkdir(parents=True)
        (tmp_path / f"hospital{i}" / "SST-2" / "train.tsv").write_text("\n".join(rows[:1] + rows[start : start + n]) + "\n")
        out.append(tmp_path / f"hospital{i}")
        start += n
    return out


def test_nodes_with_their_own_data_need_not_have_the_runs(tiny_models, tmp_path, monkeypatch):
    """Hospitals whose machines hold their own rows and not the run's data set (data.data_dir is
    not there): they train on their rows, as nodes that also hold the run's data set do
    (the same updates, so the same global model, to round-off), and never read the run's files."""
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedex", fed__rounds=2)
    run_config = flower_run_config(over)
    cfg = config_from_run_config(run_config)
    homes = _hospitals(tmp_path, [13, 21, 17])

    def run(where: str, node_data_dir: str):
        (tmp_path / where).mkdir()
        server = Server(build_experiment(cfg), tmp_path / where)
        grid = LocalGrid(client_module.app, run_config, 3)
        for ctx, home in zip(grid.contexts.values(), homes):
            ctx.node_config["data"] = str(home)
            ctx.run_config["data.data_dir"] = node_data_dir
        client_module._CACHE.clear()
        return server, flower_engine(grid)(server, server.initial_state())

    server, state = run("without", str(tmp_path / "not-on-this-machine"))
    assert {r["client"]: r["examples"] for r in server.client_rows if r["round"] == 1} == {"client0": 13, "client1": 21, "client2": 17}
    assert [r["clients"] for r in server.rounds] == [3, 3] and not any(r.get("dropped") for r in server.rounds)
    # the reference: nodes that hold the run's data set too and build the whole experiment with it, as every node did before
    real = client_module.build_experiment
    monkeypatch.setattr(client_module, "build_experiment", lambda c, with_data=True: real(c, with_data=True))
    _, ref = run("with", str(GLUE))
    for m, a in ref.adapters.items():
        torch.testing.assert_close(state.adapters[m].B, a.B, rtol=0, atol=1e-6)
        torch.testing.assert_close(state.adapters[m].A, a.A, rtol=0, atol=1e-6)


def test_local_dp_nodes_with_their_own_data_train_at_the_servers_noise(tiny_models, tmp_path, monkeypatch):
    """Local DP-SGD at a target ε, nodes with their own rows beside one on a partition: each
    trains at the z the server planned on its partitions (not the smaller z its own, larger
    set would allow), so the ε the server reports for it is the accountant's for that z, its
    own q and steps, and stays within the target."""
    from fedlora.engine.train import planned_steps
    from fedlora.privacy import epsilon

    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedit", fed__rounds=1, privacy__mode="local", privacy__target_epsilon=8, privacy__delta=1e-3)
    run_config = flower_run_config(over)
    cfg = config_from_run_config(run_config)
    homes = _hospitals(tmp_path, [40, 50, 60])  # more rows than any of the server's partitions (80 over 3)
    (tmp_path / "flower").mkdir()
    server = Server(build_experiment(cfg), tmp_path / "flower")
    z = server.exp.privacy.noise_multiplier
    grid = LocalGrid(client_module.app, run_config, 3)
    # partitions 0 and 2 on hospitals' own rows, partition 1 on a partition of the run's data set, in one process:
    # the experiment built without data for node 0 is built again with it for node 1, and serves node 2
    sizes = [40, len(server.exp.clients[1].indices), 60]
    for i, (ctx, home) in enumerate(zip(grid.contexts.values(), homes)):
        if i != 1:
            ctx.node_config["data"] = str(home)
    builds = []
    real_build = client_module.build_experiment

    def build(c, with_data=True):
        builds.append(with_data)
        return real_build(c, with_data=with_data)

    monkeypatch.setattr(client_module, "build_experiment", build)
    trained_at = []
    real = client_module.run_client

    def spy(*a, privacy=None, **k):
        trained_at.append(privacy.noise_multiplier)
        return real(*a, privacy=privacy, **k)

    monkeypatch.setattr(client_module, "run_client", spy)
    client_module._CACHE.clear()
    flower_engine(grid)(server, server.initial_state())
    assert trained_at == [z] * 3 and builds == [False, True]
    for n, row in zip(sizes, sorted(server.client_rows, key=lambda r: r["client"])):
        spent = epsilon("rdp", z, cfg.train.batch_size / n, planned_steps(n, cfg.train), 1e-3)
        assert row["examples"] == n and row["epsilon"] == pytest.approx(spent, rel=1e-9) and spent <= 8


def _csv_rows(split: str, start: int, n: int) -> str:
    """``n`` SST-2 rows from ``start`` as a user's CSV: text, and the label by name."""
    rows = (GLUE / "SST-2" / f"{split}.tsv").read_text().splitlines()[1 + start : 1 + start + n]
    names = ("negative", "positive")
    return "text,label\n" + "".join(f'"{r.split(chr(9))[0].replace(chr(34), "")}",{names[int(r.split(chr(9))[1])]}\n' for r in rows)


def test_a_server_without_a_training_set_runs_on_the_nodes_rows(tiny_models, tmp_path):
    """data.node_data=true: hospitals with their own CSV files, a server with the evaluation file
    only (data.train_file is on no machine), local DP at a given noise multiplier. The run gives
    what the same nodes give under a server that also holds a training set of its own (which the
    nodes never train on): the same global model and evaluation every round; each node's ε is the
    accountant's for its own q and steps; and no label histogram is written (the server never
    sees the nodes' labels)."""
    from engine_support import read_jsonl

    from fedlora.core.serialize import state_from_dict
    from fedlora.engine.run import run_experiment
    from fedlora.engine.train import planned_steps
    from fedlora.privacy import epsilon

    sizes = [30, 40, 50]
    homes = []
    for i, n in enumerate(sizes):
        homes.append(tmp_path / f"hospital{i}.csv")
        homes[-1].write_text(_csv_rows("train", 100 * i, n))
    (tmp_path / "eval.csv").write_text(_csv_rows("dev", 0, 40))
    (tmp_path / "server-train.csv").write_text(_csv_rows("train", 1000, 60))

    def run(name: str, *extra: str):
        over = overrides(tiny_models["bert"], tmp_path / name, fed__method="fedex", fed__rounds=2, data__task="file", **LOCAL_DP)
        over += [f"data.eval_file={tmp_path / 'eval.csv'}", "data.label_names=[negative,positive]", *extra]
        run_config = flower_run_config(over)
        grid = LocalGrid(client_module.app, run_config, 3)
        for ctx, home in zip(grid.contexts.values(), homes):
            ctx.node_config["data"] = str(home)
        client_module._CACHE.clear()
        run_experiment(config_from_run_config(run_config), engine=flower_engine(grid), plots=False)
        (folder,) = (tmp_path / name).iterdir()
        return folder

    mine = run("node-data", f"data.train_file={tmp_path / 'on-no-machine.csv'}", "data.node_data=true")
    ref = run("server-data", f"data.train_file={tmp_path / 'server-train.csv'}")
    assert not (mine / "label_histogram.csv").exists() and (ref / "label_histogram.csv").exists()
    rows, ref_rows = read_jsonl(mine / "metrics.jsonl"), read_jsonl(ref / "metrics.jsonl")
    assert [r["eval_accuracy"] for r in rows] == pytest.approx([r["eval_accuracy"] for r in ref_rows], abs=1e-12)
    assert [r["epsilon"] for r in rows] == pytest.approx([r["epsilon"] for r in ref_rows], rel=1e-12)
    got, want = (state_from_dict(torch.load(f / "checkpoint.pt", weights_only=False)["state"]) for f in (mine, ref))
    assert got.adapters.keys() == want.adapters.keys()
    for m, a in want.adapters.items():
        torch.testing.assert_close(got.adapters[m].B, a.B, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.adapters[m].A, a.A, rtol=0, atol=1e-6)
    cfg = load_config(None, overrides(tiny_models["bert"], tmp_path, **LOCAL_DP))
    for row in read_jsonl(mine / "clients.jsonl"):
        n = sizes[int(row["client"].removeprefix("client"))]
        spent = epsilon("rdp", 1.0, cfg.train.batch_size / n, planned_steps(n, cfg.train) * row["round"], 1e-3)
        assert row["examples"] == n and row["epsilon"] == pytest.approx(spent, rel=1e-9)


def test_nodes_with_their_own_rows_score_the_final_model_on_them(tiny_models, tmp_path):
    """data.node_data=true and fed.received_eval: after the last round each hospital scores the final
    model, sent in an evaluate message, on the rows it holds out of its own file. Reference: the
    exported adapter loaded with peft, each held-out sentence tokenised by the model's tokenizer and
    scored alone, the accuracies weighted by the hospitals' held-out counts."""
    import numpy as np
    from peft import PeftModel
    from sklearn.metrics import roc_auc_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedlora.engine.experiment import personal_split
    from fedlora.engine.run import run_experiment
    from fedlora.engine.seeding import derive_seed

    sizes, homes = [80, 100, 120], []
    for i, n in enumerate(sizes):
        homes.append(tmp_path / f"hospital{i}.csv")
        homes[-1].write_text(_csv_rows("train", 200 * i, n))
    (tmp_path / "eval.csv").write_text(_csv_rows("dev", 0, 40))
    # the tiny model with a head 100× larger: its margins spread (with the default head nearly every margin is
    # tied to round-off, and neither the accuracy nor the ranking could tell a wrong model from the right one)
    bold = tmp_path / "bold-bert"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2)
    with torch.no_grad():
        base.classifier.weight.mul_(100.0)
    base.save_pretrained(bold)
    AutoTokenizer.from_pretrained(tiny_models["bert"]).save_pretrained(bold)
    over = overrides(bold, tmp_path / "runs", fed__method="fedex", fed__rounds=2, data__task="file", fed__personal_eval=0.3, fed__received_eval="true")
    over += [
        f"data.eval_file={tmp_path / 'eval.csv'}",
        "data.label_names=[negative,positive]",
        f"data.train_file={tmp_path / 'nowhere.csv'}",
        "data.node_data=true",
        "train.lr=2e-2",
    ]
    run_config = flower_run_config(over)
    grid = LocalGrid(client_module.app, run_config, 3)
    for ctx, home in zip(grid.contexts.values(), homes):
        ctx.node_config["data"] = str(home)
    client_module._CACHE.clear()
    cfg = config_from_run_config(run_config)
    summary = run_experiment(cfg, engine=flower_engine(grid), plots=False)
    assert sum(m.metadata.message_type == "evaluate" for m in grid.sent) == 3 and summary["received_final_clients"] == 3
    (folder,) = (tmp_path / "runs").iterdir()
    tok = AutoTokenizer.from_pretrained(bold)
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(bold, num_labels=2), str(folder / "adapter")).eval()
    scores = []  # (accuracy, ROC AUC, held-out count) per hospital
    for pid, home in enumerate(homes):
        rows = [line.rsplit(",", 1) for line in home.read_text().splitlines()[1:]]
        _, held = personal_split(np.arange(len(rows)), 0.3, derive_seed(cfg.seed, "personal", pid))
        margins, labels = [], []
        for j in held:
            text, label = rows[j]
            with torch.no_grad():
                logits = model(**tok(text.strip('"'), truncation=True, max_length=64, return_tensors="pt")).logits[0].double()
            margins.append(float(logits[1] - logits[0]))
            labels.append(("negative", "positive").index(label))
        margins, labels = np.array(margins), np.array(labels)
        scores.append((np.mean((margins > 0) == labels), roc_auc_score(labels, margins), len(held)))
    total = sum(n for _, _, n in scores)
    assert summary["received_final"]["accuracy"] == pytest.approx(sum(a * n for a, _, n in scores) / total)
    # The tiny model calls nearly every sentence one class; its ranking tells a wrong model apart (nodes that score
    # without the folded base deltas are 0.023 off). Its tiny vocabulary makes many sentences the same tokens, whose
    # margins the nodes' padded batches and the one-sentence forwards here order differently by round-off: 0.004 apart.
    assert summary["received_final"]["roc_auc"] == pytest.approx(sum(u * n for _, u, n in scores) / total, abs=1e-2)


def test_a_failed_node_with_its_own_rows_spends_its_own_steps(tiny_models, tmp_path, monkeypatch):
    """Local DP: a node with its own rows (50, where the server's partition has ≈ 27) fails in
    round 2. It may have trained, so its ε counts round 2's steps as well: those of its own
    rows, which it reported in round 1, not those of the partition the server would give it."""
    from engine_support import read_jsonl

    from fedlora.engine.run import run_experiment
    from fedlora.engine.train import planned_steps
    from fedlora.privacy import epsilon

    homes = _hospitals(tmp_path, [40, 50, 60])
    over = overrides(tiny_models["bert"], tmp_path / "runs", fed__method="fedit", fed__rounds=2, **LOCAL_DP)
    run_config = flower_run_config(over)
    grid = LocalGrid(client_module.app, run_config, 3)
    for ctx, home in zip(grid.contexts.values(), homes):
        ctx.node_config["data"] = str(home)
    calls: dict[str, int] = {}
    real = client_module.run_client

    def fail_client1_in_round_2(fm, start, client, *a, **k):
        calls[client.client_id] = calls.get(client.client_id, 0) + 1
        if client.client_id == "client1" and calls["client1"] == 2:
            raise RuntimeError("the hospital's machine went down")
        return real(fm, start, client, *a, **k)

    monkeypatch.setattr(client_module, "run_client", fail_client1_in_round_2)
    client_module._CACHE.clear()
    cfg = config_from_run_config(run_config)
    run_experiment(cfg, engine=flower_engine(grid), plots=False)
    (folder,) = (tmp_path / "runs").iterdir()
    rows = {(r["client"], r["round"]): r for r in read_jsonl(folder / "clients.jsonl")}
    assert "dropped" in rows[("client1", 2)]
    steps = planned_steps(50, cfg.train)
    assert rows[("client1", 1)]["steps"] == steps and rows[("client1", 2)]["steps"] == steps
    assert read_jsonl(folder / "metrics.jsonl")[1]["epsilon"] >= epsilon("rdp", 1.0, cfg.train.batch_size / 50, 2 * steps, 1e-3)


LOCAL_DP = {"privacy__mode": "local", "privacy__noise_multiplier": 1.0, "privacy__clip": 1.0, "privacy__delta": 1e-3}


def test_a_server_without_a_training_set_refuses_what_needs_one(tiny_models, tmp_path):
    """data.node_data=true: a node without its own rows is refused at the roll-call (naming it),
    and a target ε, which the server cannot plan without the nodes' sizes, before anything runs."""
    over = overrides(tiny_models["bert"], tmp_path, data__node_data="true")
    grid = LocalGrid(client_module.app, flower_run_config(over), 3)
    for ctx in list(grid.contexts.values())[:2]:
        ctx.node_config["data"] = str(GLUE)
    with pytest.raises(ConfigError, match="node 1014 has no data=<path> in its node config; the run's data.node_data=true"):
        discover_nodes(grid, 3, timeout=5, node_data=True)
    target = load_config(None, [*over, "privacy.mode=local", "privacy.target_epsilon=3", "privacy.delta=1e-3"])
    with pytest.raises(ConfigError, match="privacy.target_epsilon with data.node_data=true"):
        build_experiment(target)


def test_local_dp_settings_come_with_the_job_and_own_rows_are_checked_against_the_target():
    """A node's DP-SGD: the clip from the run, z from the job (a job without one, from an older
    server, is refused); a node's own rows too few for the target ε at that z are refused, rows
    of a partition the server planned on are not checked again."""
    from types import SimpleNamespace

    from fedlora.engine.train import planned_steps
    from fedlora.privacy import epsilon

    cfg = load_config(None, ["privacy.mode=local", "privacy.target_epsilon=3", "privacy.delta=1e-4", "fed.rounds=4", "train.batch_size=16", "privacy.clip=0.5"])
    local = SimpleNamespace(exp=SimpleNamespace(cfg=cfg), dp_checked=set())
    z = 1.0
    assert epsilon("rdp", z, 16 / 400, planned_steps(400, cfg.train) * 4, 1e-4) <= 3 < epsilon("rdp", z, 16 / 100, planned_steps(100, cfg.train) * 4, 1e-4)
    dp = client_module._local_dp(local, {"noise-multiplier": z}, 400, own_rows=True)
    assert (dp.clip, dp.noise_multiplier) == (0.5, z)
    with pytest.raises(ConfigError, match="this node's 100 examples would spend"):
        client_module._local_dp(local, {"noise-multiplier": z}, 100, own_rows=True)
    assert client_module._local_dp(local, {"noise-multiplier": z}, 100, own_rows=False).noise_multiplier == z
    with pytest.raises(ValueError, match="the job carries no noise multiplier"):
        client_module._local_dp(local, {}, 400, own_rows=True)
    assert client_module._local_dp(SimpleNamespace(exp=SimpleNamespace(cfg=load_config(None, [])), dp_checked=set()), {}, 400, own_rows=True) is None


def test_a_file_task_node_without_the_classes_is_refused_at_the_roll_call(tiny_models, tmp_path):
    """data.task=file without data.label_names, on nodes that have their own CSV but not the run's
    training file: the roll-call stops the run, before its folder exists, saying what to give."""
    (tmp_path / "mine.csv").write_text(_csv_rows("train", 0, 20))
    over = overrides(tiny_models["bert"], tmp_path, data__task="file") + [
        f"data.train_file={tmp_path / 'server.csv'}",
        f"data.eval_file={tmp_path / 'server.csv'}",
    ]
    grid = LocalGrid(client_module.app, flower_run_config(over), 3)
    for ctx in grid.contexts.values():
        ctx.node_config["data"] = str(tmp_path / "mine.csv")
    with pytest.raises(ConfigError, match="needs the run's classes, from data.label_names"):
        discover_nodes(grid, 3, timeout=5)


def test_a_failed_build_leaves_the_cached_experiment_and_run_config_text_reads_as_the_config_does(tiny_models, tmp_path, monkeypatch):
    """The ClientApp's cache: a node with its own rows builds the experiment without data; a node
    on a partition then needs it with data, and if that build fails the working experiment stays.
    A run config that gives data.node_data as text ('false', as `--run-config` may) reads as the
    config reads it: false, so a partition node builds with data."""
    from flwr.app import Context, RecordDict

    run_config = flower_run_config(overrides(tiny_models["bert"], tmp_path))
    client_module._CACHE.clear()
    own = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3, "data": str(GLUE)}, state=RecordDict(), run_config=run_config)
    kept = client_module._local(own)
    assert kept.exp.train is None

    def broken(cfg, with_data=True):
        raise OSError("disk gone")

    monkeypatch.setattr(client_module, "build_experiment", broken)
    partition = Context(run_id=1, node_id=2, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(), run_config=run_config)
    with pytest.raises(OSError, match="disk gone"):
        client_module._local(partition)
    assert list(client_module._CACHE.values()) == [kept]
    monkeypatch.undo()
    text = Context(
        run_id=1, node_id=3, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(), run_config={**run_config, "data.node_data": "false"}
    )
    assert client_module._local(text).exp.train is not None
    client_module._CACHE.clear()


def test_a_file_task_node_needs_the_classes_not_the_runs_files(tiny_models, tmp_path):
    """data.task=file: a node with its own CSV and none of the run's files trains when the run
    config names the classes (data.label_names); without them it is refused in one line that
    says what to give."""
    from fedlora.engine.experiment import node_task

    def cfg(*extra):
        return load_config(None, ["data.task=file", f"data.train_file={tmp_path / 'server-only.csv'}", f"data.eval_file={tmp_path / 'dev.csv'}", *extra])

    task = node_task(cfg("data.label_names=[negative,positive]"))
    assert task.label_names == ("negative", "positive") and task.primary_metric == "accuracy"
    with pytest.raises(ConfigError, match="needs the run's classes, from data.label_names"):
        node_task(cfg())
    (tmp_path / "server-only.csv").write_text("text,label\na,0\nb,2\nc,1\n")  # where the machine has the run's file: its ids
    assert node_task(cfg()).label_names == ("0", "1", "2")


@pytest.mark.parametrize("transport,size", [("float32", 4), ("bfloat16", 2)])
def test_wire_bytes_are_the_arrays_sent(tiny_models, tmp_path, transport, size):
    """Flower rows add the bytes actually moved: ≥ 4 (bf16: 2) bytes per number of the
    formula, plus the base deltas a node catches up on (fedex with sampling)."""
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedex", fed__fraction=0.67, fed__transport=transport)
    server, _, grid = run_flower(over, tmp_path)
    for r in server.client_rows:
        assert r["wire_bytes_up"] >= r["bytes_up"] and r["wire_bytes_up"] < 1.2 * r["bytes_up"] + 4096
        assert r["bytes_up"] % size == 0
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    numbers = [sum(math.prod(a.shape) for rec in m.content.array_records.values() for a in rec.values()) for m in sent]
    assert sum(r["wire_bytes_down"] for r in server.client_rows) >= size * sum(numbers)
    for m in sent:
        for key, rec in m.content.array_records.items():
            for name, a in rec.items():
                # a snapshot of several rounds' deltas (a node that missed them) is a sum of bf16 values: float32
                snapshot = key == "fedlora.broadcast" and name.split("/")[0].split("-")[0] != name.split("/")[0].split("-")[1]
                want = (4 if snapshot else size) * math.prod(a.shape)
                assert want <= len(a.data) < want + 256, (key, name, a.dtype)  # numpy's .npy header on float32 arrays
    assert all(m.content["fedlora.adapters"][k].dtype == transport for m in sent for k in m.content["fedlora.adapters"])


def test_a_malformed_resync_answer_drops_that_client_only(tiny_models, tmp_path, monkeypatch, caplog):
    """A node that restarted answers "resync" with a round that cannot be: that client is
    dropped with the reason, the round finishes over the others, the run goes on."""
    from flwr.app import ConfigRecord, RecordDict

    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedex")
    run_config = flower_run_config(over)
    (tmp_path / "flower").mkdir()
    server = Server(build_experiment(config_from_run_config(run_config)), tmp_path / "flower")
    grid = LocalGrid(client_module.app, run_config, 3)
    _restart_after_round(monkeypatch, {"grid": grid}, 2, 1007, None)
    monkeypatch.setattr(client_module, "encode_resync", lambda through: RecordDict({"fedlora.resync": ConfigRecord({"through": -1})}))
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        flower_engine(grid)(server, server.initial_state())
    assert [r["clients"] for r in server.rounds] == [3, 3, 2]
    assert "client1 dropped: node 1007 sent a bad update: fedlora.resync: through must be a round ≥ 0" in caplog.text


def test_fedsb_cores_travel_instead_of_factors_and_are_read_against_the_start():
    """Fed-SB's upload: each module's r×r C, B rebuilt as B_start·C (float64) on the server."""
    from fedlora.core.adapter import from_frame

    g = torch.Generator().manual_seed(1)
    start = ClientStart(adapters={"l.q": Adapter(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g), 0.5)}, train_A=False, train_core=True)
    C = torch.randn(2, 2, generator=g)
    update = ClientUpdate("client1", 9, {"l.q": Adapter(start.adapters["l.q"].B @ C, start.adapters["l.q"].A, 0.5)}, cores={"l.q": C})
    content = encode_update(update, {"loss": 0.5, "steps": 3, "examples": 9, "tokens": 99}, partition_id=1)
    assert "fedlora.adapters" not in content.array_records and update.numel() == 4  # r² numbers, not r·(m+n)
    got, _ = decode_update(content, "client1", start)
    want = (start.adapters["l.q"].B.double() @ C.double()).float()
    assert torch.equal(got.adapters["l.q"].B, want) and torch.equal(got.adapters["l.q"].B, from_frame(start.adapters["l.q"].B, C))
    assert torch.equal(got.adapters["l.q"].A, start.adapters["l.q"].A) and got.adapters["l.q"].scale == 0.5
    with pytest.raises(MalformedRecord, match="not asked to train cores"):
        decode_update(content, "client1", None)
    content["fedlora.cores"] = encode_update(
        ClientUpdate("client1", 9, update.adapters, cores={"l.q": torch.randn(3, 2)}), {"loss": 0.5, "steps": 3, "examples": 9, "tokens": 99}, partition_id=1
    )["fedlora.cores"]
    with pytest.raises(MalformedRecord, match=r"expected \(2, 2\)"):
        decode_update(content, "client1", start)
