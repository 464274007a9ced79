"""Whole runs of the in-process engine: mixed client ranks, centralized mode, STS-B
regression with per-client evaluation, client sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from engine_support import overrides, read_jsonl, tiny_models, without_timings  # noqa: F401

from fedlora.config import load_config
from fedlora.engine import build_experiment, run_experiment, run_name

HIDDEN, MODULES = 32, 4  # tiny bert: 2 layers × {query, value}, each 32×32


def _run(cfg, **kw) -> tuple[dict, Path]:
    summary = run_experiment(cfg, **kw)
    return summary, Path(cfg.output_dir) / run_name(cfg)


def _upload_bytes(rank: int, labels: int = 2) -> int:
    """float32 numbers a client uploads: r·(m+n) per adapted module + the classifier head."""
    return 4 * (MODULES * rank * 2 * HIDDEN + labels * HIDDEN + labels)


# ---------------------------------------------------------------------- mixed ranks
@pytest.mark.parametrize("method", ["hexa", "fedhl", "flexlora", "hetlora", "flora"])
def test_mixed_client_ranks(tiny_models, tmp_path, method):
    cfg = load_config(
        None,
        overrides(
            tiny_models["bert"],
            tmp_path,
            fed__method=method,
            fed__rounds=2,
            model__client_ranks="[4,2]",
            data__max_train_examples=60,
            data__max_eval_examples=24,
        ),
    )
    summary, run_dir = _run(cfg, plots=False)
    clients = read_jsonl(run_dir / "clients.jsonl")
    assert len(clients) == 2 * 3
    # ranks cycle over the clients: 4, 2, 4
    assert {(c["client"], c["rank"]) for c in clients} == {("client0", 4), ("client1", 2), ("client2", 4)}
    for c in clients:
        assert c["bytes_up"] == _upload_bytes(c["rank"]), c
        assert c["steps"] > 0 and c["train_loss"] == c["train_loss"]  # trained, loss not NaN
    # each client's aggregation weight beside its row: p_i = n_i / Σ n_j from the rows' own example counts
    for rnd in (1, 2):
        these = [c for c in clients if c["round"] == rnd]
        total = sum(c["examples"] for c in these)
        assert [c["weights"] for c in these] == pytest.approx([c["examples"] / total for c in these])
        if method == "hexa":  # the drift-adjusted weights, a distribution, and each client's drift
            assert sum(c["hexa_weights"] for c in these) == pytest.approx(1.0) and all(c["drift"] >= 0 for c in these)
        if method == "fedhl":
            assert sum(c["fedhl_weights"] for c in these) == pytest.approx(1.0) and all(c["truncation_errors"] >= 0 for c in these)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2] and all("eval_accuracy" in r for r in rows)
    if method == "hexa":  # 1/Σ p_i² of the weights beside the client rows
        for r in rows:
            w = [c["hexa_weights"] for c in clients if c["round"] == r["round"]]
            assert r["hexa_effective_clients"] == pytest.approx(1 / sum(x * x for x in w))
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert summary["rounds"] == 2


# ------------------------------------------------------------------------ centralized
def test_centralized_mode_has_one_client_with_all_examples(tiny_models, tmp_path):
    cfg = load_config(
        None,
        overrides(
            tiny_models["bert"],
            tmp_path,
            fed__mode="centralized",
            fed__rounds=2,
            partition__num_clients=5,
            data__max_train_examples=60,
            data__max_eval_examples=24,
        ),
    )
    summary, run_dir = _run(cfg, plots=False, export=False)
    assert run_dir.name == "sst2-centralized-s0"
    clients = read_jsonl(run_dir / "clients.jsonl")
    assert [(c["round"], c["client"], c["examples"]) for c in clients] == [(1, "client0", 60), (2, "client0", 60)]
    # one pass over 60 examples in batches of 8
    assert all(c["steps"] == 8 for c in clients)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["clients"] for r in rows] == [1, 1]
    assert summary["method"] == "centralized" and "accuracy" in summary["final"]


# ------------------------------------------------------------- regression, eval_clients
def test_stsb_regression_with_per_client_eval(tiny_models, tmp_path):
    # the saved tiny model has a 2-way classification head: the task's 1-output regression
    # head replaces it
    cfg = load_config(
        None,
        overrides(
            tiny_models["bert"],
            tmp_path,
            data__task="stsb",
            fed__rounds=2,
            fed__method="fedex",
            fed__eval_clients="true",
            data__max_train_examples=60,
            data__max_eval_examples=24,
        ),
    )
    summary, run_dir = _run(cfg, plots=False)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert len(rows) == 2
    for r in rows:
        assert -1.0 <= r["eval_pearson"] <= 1.0 and -1.0 <= r["eval_spearman"] <= 1.0
        assert "eval_accuracy" not in r
        local = sorted(k for k in r if k.startswith("local_"))
        assert local == ["local_pearson_client0", "local_pearson_client1", "local_pearson_client2"]
        assert all(-1.0 <= r[k] <= 1.0 for k in local)
    assert summary["primary_metric"] == "pearson" and set(summary["final"]) >= {"pearson", "spearman"}
    # the head travels as dense parameters: 1 output row
    clients = read_jsonl(run_dir / "clients.jsonl")
    assert all(c["bytes_up"] == _upload_bytes(4, labels=1) for c in clients)
    # the exported adapter loads on the pretrained folder as a regression model
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(cfg.model.name)
    config.problem_type = None
    config.num_labels = 1
    config.problem_type = "regression"
    base = AutoModelForSequenceClassification.from_pretrained(cfg.model.name, config=config, ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    assert model.base_model.model.classifier.modules_to_save["default"].weight.shape == (1, HIDDEN)


def test_new_head_is_initialised_from_the_run_seed(tiny_models, tmp_path):
    """A head the checkpoint lacks (here: regression on a classification folder) depends on
    the run's seed only, not on what the process drew before."""

    def head(seed):
        cfg = load_config(None, overrides(tiny_models["bert"], tmp_path, data__task="stsb", seed=seed, data__max_train_examples=30, data__max_eval_examples=8))
        torch.rand(7)  # disturb the global generator
        return build_experiment(cfg).fm.read_dense()

    a, b, c = head(0), head(0), head(1)
    assert a.keys() == b.keys() == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


# --------------------------------------------------------------------- client sampling
def _sampling_run(model_dir, out, seed):
    cfg = load_config(
        None,
        overrides(
            model_dir,
            out,
            fed__rounds=4,
            partition__num_clients=4,
            fed__fraction=0.5,
            seed=seed,
            data__max_train_examples=40,
            data__max_eval_examples=8,
            fed__method="fedex",
        ),
    )
    _, run_dir = _run(cfg, plots=False, export=False)
    return read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "clients.jsonl")


def test_client_sampling_fraction(tiny_models, tmp_path):
    rows, clients = _sampling_run(tiny_models["bert"], tmp_path / "a", seed=0)
    per_round = [sorted(c["client"] for c in clients if c["round"] == t) for t in range(1, 5)]
    assert all(len(s) == 2 and len(set(s)) == 2 for s in per_round), per_round
    assert [r["clients"] for r in rows] == [2, 2, 2, 2]
    assert len({tuple(s) for s in per_round}) > 1, f"every round sampled the same clients: {per_round}"
    assert set().union(*per_round) <= {f"client{i}" for i in range(4)}
    # round traffic counts the sampled clients only
    for r in rows:
        mine = [c for c in clients if c["round"] == r["round"]]
        assert r["bytes_up"] == sum(c["bytes_up"] for c in mine) == 2 * _upload_bytes(4)

    # the same seed samples (and trains) the same, another seed samples differently
    rows2, clients2 = _sampling_run(tiny_models["bert"], tmp_path / "b", seed=0)
    assert clients2 == clients
    assert [without_timings(r) for r in rows2] == [without_timings(r) for r in rows]
    _, clients3 = _sampling_run(tiny_models["bert"], tmp_path / "c", seed=1)
    per_round3 = [sorted(c["client"] for c in clients3 if c["round"] == t) for t in range(1, 5)]
    assert all(len(s) == 2 for s in per_round3)
    assert per_round3 != per_round


# ---------------------------------------------------------------------- a user's own files
def test_a_users_csv_with_string_labels_trains_through_the_cli(tiny_models, tmp_path, capsys):
    """data.task=file with labels written as names: data.label_names gives the classes (ids in
    its order, the same for both files); a name outside it is refused in one line, exit 2."""
    import csv

    from engine_support import GLUE

    from fedlora import cli

    rows = [line.split("\t") for line in (GLUE / "SST-2" / "dev.tsv").read_text().splitlines()[1:121]]
    for name, part in (("train", rows[:80]), ("eval", rows[80:])):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["review", "sentiment"])
            w.writerows([text, ["negative", "positive"][int(label)]] for text, label in part)
    data = [
        "data.task=file",
        f"data.train_file={tmp_path / 'train.csv'}",
        f"data.eval_file={tmp_path / 'eval.csv'}",
        "data.text_columns=[review]",
        "data.label_column=sentiment",
    ]
    out = tmp_path / "runs"
    assert cli.main(["run", *overrides(tiny_models["bert"], out, fed__rounds=1, name="mine"), *data, "data.label_names=[negative,positive]"]) == 0
    (row,) = read_jsonl(out / "mine" / "metrics.jsonl")
    assert row["clients"] == 3 and 0 <= row["eval_accuracy"] <= 1
    counts = [int(x) for x in (out / "mine" / "label_histogram.csv").read_text().splitlines()[1].split(",")[1:]]
    assert sum(counts) > 0
    capsys.readouterr()
    assert cli.main(["run", *overrides(tiny_models["bert"], out, fed__rounds=1, name="wrong"), *data, "data.label_names=[neg,pos]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedlora: error:") and "train.csv:2: unknown label" in err and "Traceback" not in err
    assert not (out / "wrong").exists()


# ---------------------------------------------------------------------- Fed-SB on a real model
def test_fedsb_over_a_bfloat16_wire_keeps_every_client(tiny_models, tmp_path):
    """The server keeps the B it sends, rounded to bf16 (≈ 1.6e-3 of ‖B‖ off the frame U of round 1);
    each client's B_i = B_t·C_i lies in span(B_t), so the span check must be against B_t: against U
    it refused every client from round 2 and the run failed."""
    from fedlora.engine import Simulator

    cfg = load_config(None, overrides(tiny_models["bert"], tmp_path, fed__method="fedsb", fed__transport="bfloat16", train__lr=5e-3))
    (tmp_path / "run").mkdir()
    sim = Simulator(build_experiment(cfg), tmp_path / "run")
    sim.run()
    assert [r["clients"] for r in sim.rounds] == [3, 3, 3] and all(r["dropped"] == 0 for r in sim.rounds)


def test_fedsb_clients_train_only_the_core_inside_the_round_one_frames(tiny_models, tmp_path):
    """After round 1 each client's B = Q·R with only the r×r R trained (models/lora.py's
    parametrisation): B moves, stays in the column space round 1 fixed, A does not move, and
    the server accepts every update (it refuses any B outside that space)."""
    from fedlora.engine import Simulator

    cfg = load_config(None, overrides(tiny_models["bert"], tmp_path, fed__method="fedsb", train__lr=5e-3))
    exp = build_experiment(cfg)
    rounds, real = [], exp.aggregator.aggregate

    def capture(state, updates):
        rounds.append((state, list(updates)))
        return real(state, updates)

    exp.aggregator.aggregate = capture
    (tmp_path / "run").mkdir()
    sim = Simulator(exp, tmp_path / "run")
    sim.run()
    assert len(rounds) == 3 and all(r["dropped"] == 0 for r in sim.rounds)
    # round 1 uploads the factors; later rounds each module's r×r C only (plus the head)
    head = 2 * HIDDEN + 2
    assert sim.rounds[0]["bytes_up"] == 3 * _upload_bytes(4)
    assert [r["bytes_up"] for r in sim.rounds[1:]] == [3 * 4 * (MODULES * 4 * 4 + head)] * 2
    for state, updates in rounds[1:]:
        for name, g in state.adapters.items():
            U = torch.linalg.qr(state.extra["frame"][name].double())[0]
            for u in updates:
                B = u.adapters[name].B.double()
                assert torch.equal(u.adapters[name].A, g.A)
                assert float((B - U @ (U.T @ B)).norm() / B.norm()) < 1e-5
                assert float((B - g.B.double()).norm() / g.B.double().norm()) > 1e-4  # R trained
    for layer in exp.fm.layers.values():  # the parametrisation is gone after each round: B is a plain parameter again
        assert not hasattr(layer.lora_B[f"r{cfg.model.rank}"], "parametrizations")


def test_a_target_name_the_head_shares_adapts_the_encoder_only(tiny_models, tmp_path):
    """RoBERTa's head is classifier.dense + classifier.out_proj: `model.target_modules=[query,value,dense]` put LoRA
    on classifier.dense too, whose factors then travelled and were averaged as head weights (overwriting the
    method's adapters and the fold of that module, with a peft init drawn from no seed) and the export raised a
    KeyError after the last round. Now no LoRA layer sits in the head; the export reloads with plain peft to
    the engine's global model."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedlora.engine import Simulator

    model_dir = tiny_models["roberta"]
    cfg = load_config(None, overrides(model_dir, tmp_path / "runs", fed__method="fedex", fed__rounds=2, model__target_modules="[query,value,dense]", name="r"))
    exp = build_experiment(cfg)
    assert not [m for m in exp.fm.layers if m.startswith("classifier")] and any(m.endswith("output.dense") for m in exp.fm.layers)
    assert not [k for k in exp.fm.head if "lora_" in k]
    run_experiment(cfg, plots=False)
    run_dir = tmp_path / "runs" / "r"
    sim = Simulator(build_experiment(cfg), run_dir)
    state = sim.resume_or_init()
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok(["a good film", "dull and long"], padding=True, return_tensors="pt")
    with torch.no_grad(), sim.exp.fm.global_view(sim.total_delta(state), state.dense) as model:
        model.eval()
        want = model(**batch).logits
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_decoder_classifier_pools_the_last_token_whatever_pads_its_batch(tmp_path):
    """A checkpoint whose config names another pad id than its tokenizer (collate pads with the tokenizer's):
    GPT-2's last-token pooling looked for the config's id and read a pad position, so a sentence's logits
    depended on the longer sentences beside it. The loader gives the config the tokenizer's pad id."""
    from fedlora.data.text import TextDataset
    from fedlora.data.tokenize import collate, tokenize
    from fedlora.models import tiny_model
    from fedlora.models.hub import load_pretrained

    model, tok = tiny_model("gpt2")
    model.config.pad_token_id = tok.pad_token_id + 1  # another id than the one batches are padded with
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, tok = load_pretrained(str(tmp_path / "m"), 2)
    assert model.config.pad_token_id == tok.pad_token_id
    data = tokenize(TextDataset(["a good film", "a good film and the rest of a long sentence"], None, np.zeros(2, dtype=np.int64)), tok, 64)
    model.eval()
    with torch.no_grad():
        alone = model(**{k: v for k, v in collate(data, [0], tok.pad_token_id).items() if k != "labels"}).logits[0]
        beside = model(**{k: v for k, v in collate(data, [0, 1], tok.pad_token_id).items() if k != "labels"}).logits[0]
    torch.testing.assert_close(beside, alone, atol=1e-5, rtol=1e-4)
