"""Resume equals an uninterrupted run; the run folder's files; the exported peft adapter.

Run A goes through `fedlora run` uninterrupted for 3 rounds. Run B (same config but its
own output_dir) is stopped by an exception raised right after round 2's checkpoint has
been written (what SIGKILL at that moment leaves on disk: an atomic checkpoint.pt), then
started again with the identical config and finishes from the checkpoint.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from engine_support import GLUE, assert_tree_equal, is_png, overrides, read_jsonl, tiny_models, without_timings  # noqa: F401

from fedlora import cli
from fedlora.config import load_config
from fedlora.engine import Simulator, build_experiment, run_experiment, run_name

ROUNDS, CLIENTS, TRAIN, EVAL = 3, 3, 80, 40


class Killed(RuntimeError):
    pass


def _interrupted_then_resumed(cfg) -> Path:
    """Run ``cfg``, stop it right after round 2's checkpoint, run it again to the end."""
    original = Simulator.checkpoint
    seen = []

    def checkpoint_then_die(self, state):
        original(self, state)
        seen.append(state.round)
        if state.round == 2:
            raise Killed("simulated kill after round 2's checkpoint")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Simulator, "checkpoint", checkpoint_then_die)
        with pytest.raises(Killed):
            run_experiment(cfg)
    assert seen == [1, 2]
    run_dir = Path(cfg.output_dir) / run_name(cfg)
    assert not (run_dir / "summary.json").exists() and not (run_dir / "adapter").exists()
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["round"] == 2 and len(ckpt["rounds"]) == 2

    import fedlora.engine.simulator as simulator

    calls = []
    real_run_client = simulator.run_client

    def counting_run_client(*args, **kwargs):
        calls.append(args[2].client_id)
        return real_run_client(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simulator, "run_client", counting_run_client)
        run_experiment(cfg)
    assert len(calls) == CLIENTS, "the second start trains round 3 only"
    return run_dir


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """{method: (cfg_A, run_dir_A, cfg_B, run_dir_B)} for an exact method and one with method state."""
    out = {}
    for method in ("fedex", "fedhl"):
        root = tmp_path_factory.mktemp(f"resume-{method}")
        over_a = overrides(
            tiny_models["bert"],
            root / "A",
            fed__method=method,
            fed__rounds=ROUNDS,
            partition__num_clients=CLIENTS,
            data__max_train_examples=TRAIN,
            data__max_eval_examples=EVAL,
        )
        assert cli.main(["run", *over_a]) == 0
        cfg_a = load_config(None, over_a)
        cfg_b = load_config(
            None,
            overrides(
                tiny_models["bert"],
                root / "B",
                fed__method=method,
                fed__rounds=ROUNDS,
                partition__num_clients=CLIENTS,
                data__max_train_examples=TRAIN,
                data__max_eval_examples=EVAL,
            ),
        )
        run_b = _interrupted_then_resumed(cfg_b)
        out[method] = (cfg_a, Path(cfg_a.output_dir) / run_name(cfg_a), cfg_b, run_b)
    return out


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("method", ["fedex", "fedhl"])
def test_resumed_run_equals_uninterrupted(runs, method):
    _, dir_a, _, dir_b = runs[method]
    a = torch.load(dir_a / "checkpoint.pt", weights_only=True)
    b = torch.load(dir_b / "checkpoint.pt", weights_only=True)
    assert a["state"]["round"] == b["state"]["round"] == ROUNDS
    # server state: adapters, dense head, factored base delta, the method's own state (FedHL's basis)
    assert_tree_equal(a["state"], b["state"], "state")
    assert_tree_equal(a["base"], b["base"], "base")  # folded base weights W0
    assert_tree_equal(a["folded"], b["folded"], "folded")
    if method == "fedhl":
        assert a["state"]["extra"], "fedhl keeps method state between rounds"
    if method == "fedex":
        assert a["folded"], "fedex folds a residual into W0"
    # per-round and per-client rows, wall-clock timings aside
    rows_a, rows_b = read_jsonl(dir_a / "metrics.jsonl"), read_jsonl(dir_b / "metrics.jsonl")
    assert [r["round"] for r in rows_a] == [r["round"] for r in rows_b] == [1, 2, 3]
    assert [without_timings(r) for r in rows_a] == [without_timings(r) for r in rows_b]
    assert read_jsonl(dir_a / "clients.jsonl") == read_jsonl(dir_b / "clients.jsonl")
    # the exported adapters are the same tensors
    from safetensors.torch import load_file

    ta = load_file(dir_a / "adapter" / "adapter_model.safetensors")
    tb = load_file(dir_b / "adapter" / "adapter_model.safetensors")
    assert_tree_equal(ta, tb, "adapter")
    sa, sb = json.loads((dir_a / "summary.json").read_text()), json.loads((dir_b / "summary.json").read_text())
    assert sa["final"] == sb["final"] and sa["best"] == sb["best"] and sa["best_round"] == sb["best_round"]


def test_sigkill_then_resume_equals_uninterrupted(runs, tmp_path):
    """A real `fedlora run` process killed with SIGKILL after its first round; the run is
    then resumed in process and must end exactly where the uninterrupted run A ended."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg_a, dir_a, _, _ = runs["fedex"]
    over = overrides(
        Path(cfg_a.model.name),
        tmp_path / "K",
        fed__method="fedex",
        fed__rounds=ROUNDS,
        partition__num_clients=CLIENTS,
        data__max_train_examples=TRAIN,
        data__max_eval_examples=EVAL,
    )
    cfg_k = load_config(None, over)
    run_dir = Path(cfg_k.output_dir) / run_name(cfg_k)
    proc = subprocess.Popen([sys.executable, "-m", "fedlora.cli", "run", *over], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists() and metrics.read_text().count("\n") >= 1:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = torch.load(run_dir / "checkpoint.pt", weights_only=True)["state"]["round"]
    assert 1 <= done < ROUNDS and not (run_dir / "summary.json").exists()

    run_experiment(cfg_k)
    a = torch.load(dir_a / "checkpoint.pt", weights_only=True)
    k = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for part in ("state", "base", "folded"):
        assert_tree_equal(a[part], k[part], part)
    assert [without_timings(r) for r in read_jsonl(dir_a / "metrics.jsonl")] == [without_timings(r) for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert read_jsonl(dir_a / "clients.jsonl") == read_jsonl(run_dir / "clients.jsonl")


def test_rerun_of_finished_run_trains_nothing(runs, monkeypatch):
    cfg_a, dir_a, _, _ = runs["fedex"]
    before = (dir_a / "checkpoint.pt").read_bytes()

    def no_training(*a, **k):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr("fedlora.engine.simulator.run_client", no_training)
    run_experiment(cfg_a, plots=False)
    assert (dir_a / "checkpoint.pt").read_bytes() == before
    assert len(read_jsonl(dir_a / "metrics.jsonl")) == ROUNDS


def _fixture_overrides(cfg, **kw) -> list[str]:
    """The fedex fixture run's overrides (its model and output folder), with ``kw`` on top."""
    return overrides(
        Path(cfg.model.name),
        Path(cfg.output_dir),
        fed__method="fedex",
        fed__rounds=ROUNDS,
        partition__num_clients=CLIENTS,
        data__max_train_examples=TRAIN,
        data__max_eval_examples=EVAL,
        **kw,
    )


def test_resume_with_a_different_config_is_refused_and_leaves_the_folder_alone(runs, capsys):
    cfg_a, dir_a, _, _ = runs["fedex"]
    config_before = (dir_a / "config.yaml").read_text()
    ckpt_before = (dir_a / "checkpoint.pt").read_bytes()
    assert cli.main(["run", *_fixture_overrides(cfg_a, train__lr=1e-3, name=dir_a.name)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedlora: error:") and "different configuration" in err and "Traceback" not in err
    assert (dir_a / "config.yaml").read_text() == config_before
    assert (dir_a / "checkpoint.pt").read_bytes() == ckpt_before


def test_a_checkpoint_of_other_modules_is_refused_and_left_alone(runs, tmp_path, capsys):
    """A checkpoint whose adapters name modules the model does not have (a bi-encoder run written
    before `as_siamese` dropped BERT's pooler, say) cannot resume: one line, the file untouched."""
    cfg_a, dir_a, _, _ = runs["fedex"]
    copy = Path(cfg_a.output_dir) / "other-modules"
    shutil.copytree(dir_a, copy)
    ckpt = torch.load(copy / "checkpoint.pt", weights_only=True)
    first = next(iter(ckpt["state"]["adapters"]))
    ckpt["state"]["adapters"]["bert.pooler.dense"] = ckpt["state"]["adapters"][first]
    torch.save(ckpt, copy / "checkpoint.pt")
    before = (copy / "checkpoint.pt").read_bytes()
    assert cli.main(["run", *_fixture_overrides(cfg_a, name="other-modules")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "other modules than this model has (bert.pooler.dense" in err[0], err
    assert (copy / "checkpoint.pt").read_bytes() == before


# ------------------------------------------------------------------------ run folder
def test_run_folder_contents(runs):
    cfg, run_dir, _, _ = runs["fedex"]
    names = {p.name for p in run_dir.iterdir()}
    for f in [
        "config.yaml",
        "metrics.jsonl",
        "metrics.csv",
        "clients.jsonl",
        "clients.csv",
        "label_histogram.csv",
        "label_histogram.png",
        "metrics.png",
        "summary.json",
        "checkpoint.pt",
        "adapter",
    ]:
        assert f in names, f
    assert not [n for n in names if n.endswith(".tmp")], "no half-written files are left"

    # config.yaml: the resolved configuration, loadable back
    assert load_config(run_dir / "config.yaml") == cfg
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["fed"]["method"] == "fedex"

    # metrics: one row per round, in jsonl and csv, with traffic and the eval metric
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    with open(run_dir / "metrics.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == ROUNDS
    for r, c in zip(rows, csv_rows):
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0 and r["clients"] == CLIENTS
        assert 0.0 <= r["eval_accuracy"] <= 1.0
        assert int(c["round"]) == r["round"] and float(c["eval_accuracy"]) == pytest.approx(r["eval_accuracy"])
        assert int(c["bytes_up"]) == r["bytes_up"]

    # compute: CPU seconds of each round's training beside its wall time, summed in the summary
    assert all(r["train_cpu_s"] > 0 and r["train_s"] > 0 for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_cpu_s"] == pytest.approx(sum(r["train_cpu_s"] for r in rows))

    # accuracy on 40 dev examples is a multiple of 1/40
    for r in rows:
        assert abs(r["eval_accuracy"] * EVAL - round(r["eval_accuracy"] * EVAL)) < 1e-9

    # clients: one row per client per round; uploads are r·(m+n) per module + the head, as float32
    clients = read_jsonl(run_dir / "clients.jsonl")
    assert len(clients) == ROUNDS * CLIENTS
    assert sorted((c["round"], c["client"]) for c in clients) == [(t, f"client{i}") for t in range(1, ROUNDS + 1) for i in range(CLIENTS)]
    hidden, modules, labels, r = 32, 2 * 2, 2, cfg.model.rank  # tiny bert: 2 layers × {query, value}, 32×32
    expected_up = 4 * (modules * r * (hidden + hidden) + labels * hidden + labels)
    assert all(c["bytes_up"] == expected_up for c in clients)
    assert all(c["bytes_down"] >= expected_up for c in clients)
    with open(run_dir / "clients.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == ROUNDS * CLIENTS
    # round traffic is the sum over its clients
    for row in rows:
        mine = [c for c in clients if c["round"] == row["round"]]
        assert row["bytes_up"] == sum(c["bytes_up"] for c in mine)
        assert row["bytes_down"] == sum(c["bytes_down"] for c in mine)
    # every client saw all its examples: the 80 training examples split among 3 clients
    assert sum(c["examples"] for c in clients if c["round"] == 1) == TRAIN

    # label histogram: one row per client, counts adding up to the training set
    with open(run_dir / "label_histogram.csv", newline="") as f:
        hist = list(csv.DictReader(f))
    assert [h["client"] for h in hist] == [f"client{i}" for i in range(CLIENTS)]
    assert sum(int(h["total"]) for h in hist) == TRAIN
    label_cols = [k for k in hist[0] if k not in ("client", "total")]
    assert len(label_cols) == 2
    for h in hist:
        assert sum(int(h[k]) for k in label_cols) == int(h["total"])
    # ... and the SST-2 label counts of the 80 sampled examples
    from fedlora.data import get_task, load_glue

    train = load_glue(get_task("sst2"), "train", data_dir=GLUE, max_examples=TRAIN, seed=cfg.seed)
    assert sorted(sum(int(h[k]) for h in hist) for k in label_cols) == sorted(torch.bincount(torch.as_tensor(train.labels), minlength=2).tolist())

    # summary: best and final agree with the metrics rows
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["accuracy"] == rows[-1]["eval_accuracy"]
    assert summary["best"]["accuracy"] == max(r["eval_accuracy"] for r in rows)
    assert rows[summary["best_round"] - 1]["eval_accuracy"] == summary["best"]["accuracy"]
    assert summary["last_half"]["accuracy"] == pytest.approx((rows[1]["eval_accuracy"] + rows[2]["eval_accuracy"]) / 2)  # ⌈3/2⌉ = 2 rounds
    # the machine that made the compute figures, read independently from /proc/cpuinfo
    assert summary["hardware"].startswith("cpu: ") and summary["hardware"].endswith((", bf16", ", fp32"))
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        name = next(line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name"))
        assert summary["hardware"] in (f"cpu: {name}, bf16", f"cpu: {name}, fp32")
    assert summary["rounds"] == ROUNDS and summary["method"] == "fedex"
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rows)

    # plots are PNG files; the adapter folder is a peft adapter
    assert is_png(run_dir / "metrics.png") and is_png(run_dir / "label_histogram.png")
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and (run_dir / "adapter" / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- export
def _sentences(n: int = 24) -> list[str]:
    lines = (GLUE / "SST-2" / "dev.tsv").read_text().splitlines()[1 : n + 1]
    return [line.split("\t")[0] for line in lines]


@pytest.mark.parametrize("method", ["fedex", "fedhl"])
def test_exported_adapter_reproduces_the_global_model(runs, method):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg, run_dir, _, _ = runs[method]
    model_dir = cfg.model.name
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok(_sentences(), padding=True, truncation=True, max_length=cfg.model.max_length, return_tensors="pt")

    # the engine's global model at the end of the run, rebuilt from its checkpoint
    exp = build_experiment(cfg)
    state = Simulator(exp, run_dir).resume_or_init()
    assert state.round == ROUNDS
    with torch.no_grad(), exp.fm.global_view(exp.aggregator.global_delta(state), state.dense) as model:
        model.eval()
        engine_logits = model(**batch).logits

    # peft's own loading of the exported folder onto the pretrained base
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    peft_model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    with torch.no_grad():
        peft_logits = peft_model(**batch).logits
        pretrained_logits = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()(**batch).logits
    assert not torch.allclose(engine_logits, pretrained_logits, atol=1e-4), "the run changed the model"
    torch.testing.assert_close(peft_logits, engine_logits, atol=1e-5, rtol=1e-4)

    ranks = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert max(ranks.values()) == summary["adapter_max_rank"]
    # the global update is more than one rank-r adapter: folded residuals (fedex) or the
    # untruncated global update (fedhl)
    assert summary["adapter_max_rank"] > cfg.model.rank


def test_export_is_the_smaller_exact_form_and_a_rank_limit_reports_its_error(runs, tmp_path):
    """Per module, factors at the numerical rank k cost k·(m+n) numbers and the merged weight
    m·n: a module past k = m·n/(m+n) is exported merged (a peft modules_to_save copy), and the
    folder still reproduces the global model. With a rank limit, each module is its best rank-2
    approximation: checked against a float64 SVD of the dense update, error included."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedlora.models.export import export_peft_adapter

    cfg, run_dir, _, _ = runs["fedex"]
    exp = build_experiment(cfg)
    sim = Simulator(exp, run_dir)
    state = sim.resume_or_init()
    total = sim.total_delta(state)
    # Every module of this run is past m·n/(m+n); one is cut to rank 3 so both forms occur.
    low = sorted(total)[0]
    total[low] = total[low].svd(rank=3).factored()
    dense = {name: d.dense().double() for name, d in total.items()}
    svals = {name: torch.linalg.svdvals(D) for name, D in dense.items()}
    num_rank = {name: int((s > 1e-6 * s[0]).sum()) for name, s in svals.items()}
    m, n = next(iter(dense.values())).shape
    high = {name for name, k in num_rank.items() if k * (m + n) >= m * n}
    assert high == set(total) - {low} and num_rank[low] == 3, num_rank

    args = (exp.fm, total, state.dense, cfg.model.name, 2, False)
    exact = export_peft_adapter(*args, tmp_path / "exact")
    assert set(exact.merged) == high and exact.ranks == {low: 3}
    assert exact.numbers == len(high) * m * n + 3 * (m + n) < sum(num_rank[k] * (m + n) for k in dense)
    limited = export_peft_adapter(*args, tmp_path / "rank2", rank_limit=2)
    assert limited.merged == [] and set(limited.ranks.values()) == {2}
    dropped = sum(float(s[2:].square().sum()) for s in svals.values())
    assert limited.rel_error == pytest.approx((dropped / sum(float(s.square().sum()) for s in svals.values())) ** 0.5, rel=1e-5)
    # Every module past the threshold: peft needs one LoRA target, the lowest-rank module stays factored.
    del total[low]
    low_dense = dense.pop(low)
    all_high = export_peft_adapter(exp.fm, total, state.dense, cfg.model.name, 2, False, tmp_path / "all-high")
    assert len(all_high.ranks) == 1 and len(all_high.merged) == len(total) - 1

    def loaded(folder):
        """The folder as a user loads it, merged: W0 + ΔW of every module, and the head."""
        base = AutoModelForSequenceClassification.from_pretrained(cfg.model.name, num_labels=2)
        return PeftModel.from_pretrained(base, str(folder)).merge_and_unload().eval()

    pretrained = dict(AutoModelForSequenceClassification.from_pretrained(cfg.model.name, num_labels=2).named_modules())

    def check(folder, deltas, rank=None):
        mods = dict(loaded(folder).named_modules())
        for name, D in deltas.items():
            if rank is not None:  # the best rank-`rank` approximation, from a float64 SVD
                U, S, Vh = torch.linalg.svd(D, full_matrices=False)
                D = (U[:, :rank] * S[:rank]) @ Vh[:rank]
            want = pretrained[name].weight.double() + D
            torch.testing.assert_close(mods[name].weight.double(), want, atol=1e-6, rtol=1e-5, msg=name)
        for key, value in state.dense.items():  # the trained head
            torch.testing.assert_close(dict(loaded(folder).named_parameters())[key], value)

    check(tmp_path / "all-high", dense)
    assert torch.equal(dict(loaded(tmp_path / "all-high").named_modules())[low].weight, pretrained[low].weight)
    dense[low] = low_dense
    check(tmp_path / "exact", dense)
    check(tmp_path / "rank2", dense, rank=2)
    assert limited.rel_error > 1e-3, "the truncation must change the model for the check to have power"

    # and the logits of the exact export are the engine's global model's
    tok = AutoTokenizer.from_pretrained(cfg.model.name)
    batch = tok(_sentences(), padding=True, truncation=True, max_length=cfg.model.max_length, return_tensors="pt")
    with torch.no_grad(), exp.fm.global_view(exp.aggregator.global_delta(state), state.dense) as model:
        model.eval()
        engine_logits = model(**batch).logits
        total[low] = sim.total_delta(state)[low]
        export_peft_adapter(exp.fm, total, state.dense, cfg.model.name, 2, False, tmp_path / "run-export")
        torch.testing.assert_close(loaded(tmp_path / "run-export")(**batch).logits, engine_logits, atol=1e-5, rtol=1e-4)


def test_a_run_with_an_export_rank_reports_the_reloaded_folders_metrics(tiny_models, tmp_path):
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedex", fed__rounds=2, model__export_rank=1)
    assert cli.main(["run", *over]) == 0
    summary = json.loads(next(tmp_path.glob("*/summary.json")).read_text())
    assert summary["adapter_max_rank"] == 1 and 0 < summary["export_rel_error"] < 1
    assert set(summary["export_metrics"]) >= {"accuracy"} and 0 <= summary["export_metrics"]["accuracy"] <= 1


def test_a_module_the_checkpoint_lacks_trains_and_travels_with_the_head(tmp_path):
    """DeBERTa-v3's base checkpoint has no pooler: transformers draws one at random at every load.
    Frozen, it differed between the run and every reload of its export. Now it trains with the head
    and is exported with it: two independent reloads by plain peft give the engine's logits."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedlora.models import tiny_model

    model_dir = tmp_path / "deberta-no-pooler"
    model, tok = tiny_model("deberta")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    weights = load_file(model_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("pooler.")}, model_dir / "model.safetensors", metadata={"format": "pt"})

    over = overrides(model_dir, tmp_path / "runs", fed__method="fedex", fed__rounds=2, partition__num_clients=2, name="r")
    assert cli.main(["run", *over]) == 0
    cfg, run_dir = load_config(None, over), tmp_path / "runs" / "r"
    exp = build_experiment(cfg)
    state = Simulator(exp, run_dir).resume_or_init()
    batch = AutoTokenizer.from_pretrained(model_dir)(_sentences(8), padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad(), exp.fm.global_view(exp.aggregator.global_delta(state), state.dense) as m:
        m.eval()
        engine = m(**batch).logits
    for _ in range(2):  # each plain load draws another pooler; the export's replaces it
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
        with torch.no_grad():
            got = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()(**batch).logits
        torch.testing.assert_close(got, engine, atol=1e-5, rtol=1e-4)
    assert "pooler.dense.weight" in exp.fm.head  # trained with the head
