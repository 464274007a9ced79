"""Devices and precision (``models/device.py``): what resolves to what, that autocast really
runs the matrix products in bf16 while the trained weights and everything the core aggregates
stay float32 on the CPU, and that gradient checkpointing recomputes activations without
changing the gradients. (No GPU here: CUDA paths are checked by the same code on a GPU machine.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
from engine_support import overrides, tiny_models  # noqa: F401  (fixture)

from fedlora.config import ConfigError, load_config
from fedlora.engine import Server, build_experiment
from fedlora.engine.client import run_client
from fedlora.models import device as device_module
from fedlora.models.device import Placement, cpu_bf16_speedup, cpu_has_bf16, resolve_placement


def test_resolution_on_this_machine():
    # auto: bf16 where the CPU computes it natively and the probe times it faster (BENCHMARKS.md "Precision"), else fp32
    flags = "avx512_bf16" in open("/proc/cpuinfo").read() or "amx_bf16" in open("/proc/cpuinfo").read()
    assert cpu_has_bf16() == flags
    want = torch.bfloat16 if flags and cpu_bf16_speedup(torch.get_num_threads()) >= 1.1 else None
    assert resolve_placement("auto", "auto") == Placement(torch.device("cpu"), want)
    assert resolve_placement("cpu", "bf16").dtype is torch.bfloat16
    assert resolve_placement("cpu", "fp32").precision == "fp32"
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_placement("cuda:0", "auto")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_placement("cpu", "fp16")
    with pytest.raises(ConfigError, match="train.device must be"):
        resolve_placement("gpu", "auto")
    with pytest.raises(ConfigError, match="train.precision must be"):
        resolve_placement("cpu", "fp8")


def test_auto_precision_on_a_cpu_follows_the_timed_probe(monkeypatch, tmp_path):
    """bf16 flags alone do not pick bf16: the probe's speedup must reach 1.1; without the flags the probe
    never runs. The probe leaves the global random state where it was (seeded runs stay seeded)."""
    calls = []

    def probe(speedup):
        return lambda threads: calls.append(threads) or speedup

    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(device_module, "cpu_bf16_speedup", probe(1.74))
    assert resolve_placement("cpu", "auto").precision == "bf16"
    monkeypatch.setattr(device_module, "cpu_bf16_speedup", probe(0.55))
    assert resolve_placement("cpu", "auto").precision == "fp32"
    assert resolve_placement("cpu", "bf16").precision == "bf16"  # a pinned precision is never second-guessed
    assert calls == [torch.get_num_threads()] * 2
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: False)
    assert resolve_placement("cpu", "auto").precision == "fp32" and len(calls) == 2
    cpu_bf16_speedup.cache_clear()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a one-repetition timing must not become this machine's
    before = torch.get_rng_state()
    assert cpu_bf16_speedup(1, reps=1) > 0
    assert torch.equal(before, torch.get_rng_state())


def test_the_probe_is_measured_once_per_machine(monkeypatch, tmp_path):
    """A timing taken beside other jobs can fall on either side of 1.1: a run killed in round 1 and
    resumed in another process trained its rounds at two precisions (a flaky resume test showed it).
    The first measurement is kept per machine, CPU model, torch version and threads; a later process
    reads it; a damaged file is measured again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    timings = iter([1.3, 0.5, 0.7])
    monkeypatch.setattr(device_module, "_time_bf16_speedup", lambda reps: next(timings))
    cpu_bf16_speedup.cache_clear()
    assert cpu_bf16_speedup(1) == 1.3
    cpu_bf16_speedup.cache_clear()  # another process
    assert cpu_bf16_speedup(1) == 1.3  # read back, not measured again (0.5)
    assert cpu_bf16_speedup(2) == 0.5  # other threads: its own measurement
    path = tmp_path / "fedlora" / "cpu_bf16_speedup.json"
    assert sorted(json.loads(path.read_text()).values()) == [0.5, 1.3]
    path.write_text("{not json")
    cpu_bf16_speedup.cache_clear()
    assert cpu_bf16_speedup(1) == 0.7
    cpu_bf16_speedup.cache_clear()


def _one_client_round(exp, server):
    state = server.initial_state()
    job = server.plan(state)[0]
    return run_client(exp.fm, job.start, job.client, exp.train, exp.cfg.train, job.seed, pad_token_id=exp.pad_token_id)


def test_bf16_autocast_trains_in_bf16_and_hands_the_core_float32(tiny_models, tmp_path):
    exp = build_experiment(load_config(None, overrides(tiny_models["bert"], tmp_path, train__precision="bf16", fed__rounds=1)))
    server = Server(exp, tmp_path / "run")
    seen = set()
    query = next(layer for name, layer in exp.fm.layers.items() if name.endswith("query"))
    hook = query.get_base_layer().register_forward_hook(lambda mod, args, out: seen.add(out.dtype))
    try:
        update, stats = _one_client_round(exp, server)
    finally:
        hook.remove()
    assert seen == {torch.bfloat16}  # the frozen base matmuls ran in bf16
    assert all(p.dtype == torch.float32 for p in exp.fm.trainable_parameters())  # master weights stay fp32
    for a in update.adapters.values():
        assert a.B.dtype == a.A.dtype == torch.float32 and a.B.device.type == "cpu"
    assert all(t.dtype == torch.float32 for t in update.dense.values())
    assert math.isfinite(stats.loss) and stats.steps > 0
    state = exp.aggregator.aggregate(server.initial_state(), [update])
    assert all(a.B.dtype == torch.float32 for a in state.adapters.values())


def test_gradient_checkpointing_recomputes_and_changes_nothing(tiny_models, tmp_path):
    """Same seed, same batches: adapters equal with and without checkpointing, while each
    encoder layer's insides run twice per step (once more in backward; the layer's own hooks
    stay outside the checkpoint, so the count is taken inside it)."""
    results = {}
    for gc in (False, True):
        cfg = load_config(None, overrides(tiny_models["bert"], tmp_path / str(gc), fed__rounds=1, train__gradient_checkpointing=str(gc).lower()))
        exp = build_experiment(cfg)
        server = Server(exp, tmp_path / str(gc) / "run")
        calls = []
        inside = exp.fm.base.bert.encoder.layer[0].intermediate
        hook = inside.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        try:
            update, stats = _one_client_round(exp, server)
        finally:
            hook.remove()
        results[gc] = (update, stats.steps, len(calls))
    (plain, steps, n_plain), (ckpt, steps_gc, n_gc) = results[False], results[True]
    assert steps == steps_gc and n_plain == steps and n_gc == 2 * steps
    for name, a in plain.adapters.items():
        torch.testing.assert_close(ckpt.adapters[name].B, a.B, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ckpt.adapters[name].A, a.A, atol=1e-6, rtol=1e-5)


def test_bench_commands_run_and_report_their_ratios(tiny_models, tmp_path, capsys):
    from fedlora import cli

    over = overrides(tiny_models["bert"], tmp_path, fed__rounds=1)
    assert cli.main(["bench", "loop", *over, "--repeats", "1", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "plain peft+torch" in out and "median ratio fedlora ÷ plain" in out
    assert cli.main(["bench", "precision", *over, "--seeds", "0"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["0"]]
    assert [r[1] for r in rows] == ["fp32", "bf16"] and "bf16 ÷ fp32 throughput" in out
    assert "one seed: no interval" in out and "a difference" not in out  # one pair: no interval, no verdict


@pytest.mark.parametrize("bench", ["loop", "precision", "overhead"])
def test_bench_commands_refuse_a_run_whose_rows_are_the_flower_nodes(tiny_models, tmp_path, capsys, bench):
    """data.node_data=true: the training rows are the Flower nodes' own, which no benchmark has."""
    from fedlora import cli

    over = overrides(tiny_models["bert"], tmp_path, fed__rounds=1, data__node_data="true")
    assert cli.main(["bench", bench, *over]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "data.node_data=true" in err[0], err


@pytest.mark.parametrize("device,says", [("foo", "is not a torch device"), ("cuda:0", "no CUDA GPU")])
def test_bench_aggregation_refuses_a_fold_device_it_cannot_use(capsys, device, says):
    from fedlora import cli

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    assert cli.main(["bench", "aggregation", "--preset", "roberta-base", "--methods", "fedex", "--fold-device", device]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_bench_loops_plain_reference_uses_the_runs_optimiser(tiny_models, tmp_path, optimizer):
    """With ``train.optimizer=sgd`` the plain loop's one step is θ − η·g (g from autograd on the same batch and
    dropout mask, the clip set never to bind); with AdamW the first step moves each coordinate by about η."""
    from fedlora.bench.loop import _plain_loop
    from fedlora.data import collate

    lr = 0.05
    # fp32: the reference gradient above is taken without autocast (`auto` is bf16 on a CPU where that is faster)
    over = overrides(
        tiny_models["bert"], tmp_path, train__optimizer=optimizer, train__lr=lr, train__weight_decay=0.0, train__max_grad_norm=1e9, train__precision="fp32"
    )
    cfg = load_config(None, over)
    exp = build_experiment(cfg)
    fm, place = exp.fm, exp.fm.placement
    params = fm.trainable_parameters()
    idx = torch.arange(min(4, len(exp.train))).numpy()
    before = [p.detach().clone() for p in params]
    fm.peft.train()
    torch.manual_seed(0)
    fm.peft(**place.batch(collate(exp.train, idx, exp.pad_token_id))).loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    torch.manual_seed(0)  # the same dropout mask in the loop's forward
    _plain_loop(fm.peft, params, exp.train, [idx], exp.pad_token_id, cfg.train, place)
    moved = [p.detach() - b for p, b in zip(params, before)]
    if optimizer == "sgd":
        for m, g in zip(moved, grads):
            torch.testing.assert_close(m, -lr * g, atol=1e-6, rtol=1e-4)
    else:
        big = torch.cat([(m.abs() / lr).flatten()[g.flatten().abs() > 1e-4] for m, g in zip(moved, grads)])
        assert big.numel() > 0 and torch.allclose(big, torch.ones_like(big), atol=0.05)
