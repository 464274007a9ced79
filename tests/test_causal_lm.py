"""Causal LMs: instruction data, answer-only loss, held-out perplexity, generations, export,
and a whole federated run on a tiny random Llama (in process and through Flower's ClientApp).

References are independent of the code under test: masks checked against the template's own
rendering, the loss against per-example log-softmax sums, the export against the run's own
final loss recomputed on the pretrained base plus the exported adapter."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from engine_support import GLUE, read_jsonl

from fedlora import cli
from fedlora.config import load_config
from fedlora.data.errors import DataError
from fedlora.data.instruct import PLAIN_PROMPT, InstructDataset, load_instruct_file, render_prompt, tokenize_instruct
from fedlora.data.tokenize import collate
from fedlora.engine import run_experiment
from fedlora.engine.evaluate import language_model_loss
from fedlora.models import tiny_causal_lm

_MODELS: dict = {}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    if "llama" not in _MODELS:
        root = tmp_path_factory.mktemp("tiny-llama")
        model, tok = tiny_causal_lm("llama")
        model.save_pretrained(root)
        tok.save_pretrained(root)
        _MODELS["llama"] = root
    return _MODELS["llama"]


def sst2_rows(n: int, skip: int = 0) -> list[tuple[str, str]]:
    lines = (GLUE / "SST-2" / "train.tsv").read_text().splitlines()[1 + skip : 1 + skip + n]
    return [(s, "positive" if y == "1" else "negative") for s, y in (line.rsplit("\t", 1) for line in lines)]


@pytest.fixture(scope="module")
def instruct_files(tmp_path_factory):
    """Alpaca-style JSONL: SST-2 sentiment questions in two categories (by the answer)."""
    root = tmp_path_factory.mktemp("instruct")

    def write(name, rows):
        with (root / name).open("w") as f:
            for sentence, answer in rows:
                f.write(json.dumps({"instruction": "is the review good or bad", "input": sentence, "output": answer, "category": answer}) + "\n")
        return root / name

    return write("train.jsonl", sst2_rows(60)), write("eval.jsonl", sst2_rows(12, skip=500))


# ---------------------------------------------------------------------------------- data
def test_files_in_every_format_and_bad_ones(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"instruction": "say hi", "output": "hi"})
        + "\n"
        + json.dumps({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]})
        + "\n"
    )
    ds = load_instruct_file(tmp_path / "a.jsonl")
    assert ds.responses == ["hi", "4"] and ds.prompts[1] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2"}]
    (tmp_path / "b.csv").write_text("instruction,input,output,topic\nadd,1 and 2,3,math\nname a colour,,red,art\n")
    ds = load_instruct_file(tmp_path / "b.csv", category_field="topic")
    assert ds.prompts[0][0]["content"] == "add\n\n1 and 2" and ds.label_names == ["art", "math"] and ds.labels.tolist() == [1, 0]
    bad = {
        "empty-output": (json.dumps({"instruction": "x", "output": " "}), "no response"),
        "no-assistant": (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no response"),
        "fields": (json.dumps({"question": "x"}), "needs 'instruction' and 'output'"),
        "json": ("{not json", ":1: invalid JSON"),
    }
    for name, (line, words) in bad.items():
        (tmp_path / f"{name}.jsonl").write_text(line + "\n")
        with pytest.raises(DataError, match=words):
            load_instruct_file(tmp_path / f"{name}.jsonl")
    with pytest.raises(DataError, match="no category field 'topic'"):
        load_instruct_file(tmp_path / "a.jsonl", category_field="topic")


def test_loss_mask_covers_exactly_the_answer_plain_and_chat_template():
    _, tok = tiny_causal_lm("llama")
    messages = [{"role": "user", "content": "is the film good"}]
    ds = InstructDataset([messages], ["great fun"], torch.zeros(1, dtype=torch.int64).numpy(), ["all"])
    # No chat template: the plain template, the answer, EOS.
    t = tokenize_instruct(ds, tok, 64)
    prompt = tok(PLAIN_PROMPT.format(user="is the film good"))["input_ids"]
    answer = tok("great fun", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert t.ids.tolist() == prompt + answer and t.loss_mask.tolist() == [0] * len(prompt) + [1] * len(answer)
    # A chat template: the prompt is the template's generation prompt, the answer its assistant turn.
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
    t = tokenize_instruct(ds, tok, 64)
    gen = render_prompt(tok, messages)
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": "great fun"}], tokenize=True, return_dict=False)
    assert t.ids.tolist() == list(full) and t.loss_mask.tolist() == [0] * len(gen) + [1] * (len(full) - len(gen))
    batch = collate(t, [0], tok.pad_token_id)
    assert (batch["labels"][0] == torch.where(t.loss_mask.bool(), t.ids, -100)).all()
    # Too long: the answer keeps at least half the budget, the prompt its last tokens.
    t = tokenize_instruct(ds, tok, 6)
    assert t.lengths.tolist() == [6] and t.loss_mask.sum() >= 3 and t.ids[-1] != full[0]


def test_held_out_loss_equals_per_example_log_likelihoods(instruct_files):
    model, tok = tiny_causal_lm("llama")
    ds = load_instruct_file(instruct_files[1])
    t = tokenize_instruct(ds, tok, 64)
    got = language_model_loss(model, t, torch.arange(len(ds)).numpy(), batch_size=5, pad_token_id=tok.pad_token_id)
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            ids = t.input_ids(i)
            mask = t.loss_mask[t.offsets[i] : t.offsets[i + 1]]
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
            for pos in range(1, len(ids)):
                if mask[pos]:
                    nll -= float(logp[pos - 1, ids[pos]])
                    n += 1
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5) and got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


# ------------------------------------------------------------------------------ a run
def causal_overrides(model_dir, files, out, **kw):
    base = {
        "model.name": str(model_dir),
        "model.rank": 4,
        "model.max_length": 64,
        "data.task": "instruct",
        "data.train_file": str(files[0]),
        "data.eval_file": str(files[1]),
        "data.category_field": "category",
        "data.sample_prompts": 2,
        "data.sample_tokens": 5,
        "partition.num_clients": 3,
        "partition.scheme": "dirichlet",
        "partition.alpha": 0.5,
        "fed.rounds": 2,
        "fed.method": "fedex",
        "train.batch_size": 8,
        "train.eval_batch_size": 8,
        "train.lr": 3e-3,
        "progress": "false",
        "threads": 1,
        "output_dir": str(out),
        "name": "causal",
    }
    base.update({k.replace("__", "."): v for k, v in kw.items()})
    return [f"{k}={v}" for k, v in base.items()]


def test_federated_instruction_tuning_run_and_its_exported_adapter(tiny_llama, instruct_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, causal_overrides(tiny_llama, instruct_files, tmp_path))
    summary = run_experiment(cfg)
    run = tmp_path / "causal"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients"] == 3 for r in rows)
    assert all(math.isclose(r["eval_perplexity"], math.exp(r["eval_loss"]), rel_tol=1e-9) for r in rows)
    assert summary["primary_metric"] == "perplexity" and summary["best"]["perplexity"] == min(r["eval_perplexity"] for r in rows)
    samples = read_jsonl(run / "samples.jsonl")
    assert [s["round"] for s in samples] == [1, 1, 2, 2] and all(isinstance(s["answer"], str) for s in samples)
    # The exported adapter on the pretrained base is the global model: same held-out loss.
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    # each adapted module as LoRA factors or, past rank m·n/(m+n), as its merged weight
    adapted = adapter["target_modules"] + (adapter["modules_to_save"] or [])
    assert adapter["task_type"] == "CAUSAL_LM" and {m.split(".")[-1] for m in adapted} == {"q_proj", "v_proj"}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), run / "adapter")
    _, tok = tiny_causal_lm("llama")
    dev = tokenize_instruct(load_instruct_file(instruct_files[1], category_field="category"), tok, 64)
    again = language_model_loss(model, dev, torch.arange(len(dev)).numpy(), 8, tok.pad_token_id)
    assert again["loss"] == pytest.approx(rows[-1]["eval_loss"], rel=1e-4)


@pytest.mark.parametrize(
    "setting,words",
    [
        ({"model__target_modules": "[query,value]"}, ["no module matches LoRA target_modules"]),
        ({"fed__options": "{class_aware_head: true}", "fed__method": "hexa"}, ["class_aware_head", "causal LM has none"]),
        ({"data__eval_file": "/nonexistent/eval.jsonl"}, ["instruction file", "not found"]),
    ],
    ids=["target-modules", "class-aware-head", "missing-file"],
)
def test_bad_causal_input_is_one_line(tiny_llama, instruct_files, tmp_path, capsys, setting, words):
    out = tmp_path / "runs"
    code = cli.main(["run", *causal_overrides(tiny_llama, instruct_files, out, **setting)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("fedlora: error:"), err
    assert all(w in err[0] for w in words), err
    assert not out.exists()


def test_an_instruction_without_answer_is_refused_by_name(tiny_llama, instruct_files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(instruct_files[0].read_text() + json.dumps({"instruction": "say nothing", "output": "", "category": "positive"}) + "\n")
    out = tmp_path / "runs"
    code = cli.main(["run", *causal_overrides(tiny_llama, (bad, instruct_files[1]), out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("fedlora: error:") and "bad.jsonl:61" in err and "no response" in err
    assert not out.exists()


def test_generate_answers_with_the_runs_adapter_as_the_run_did(tiny_llama, instruct_files, tmp_path, capsys):
    """`fedlora generate` on the exported adapter gives the answers the run's global model gave
    to the same prompts in its last evaluation (greedy decoding, same template)."""
    cfg = load_config(None, causal_overrides(tiny_llama, instruct_files, tmp_path))
    run_experiment(cfg)
    last = [s for s in read_jsonl(tmp_path / "causal" / "samples.jsonl") if s["round"] == 2]
    code = cli.main(["generate", str(tmp_path / "causal"), *(s["prompt"] for s in last), "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert code == 0
    assert out == "".join(f"### {s['prompt']}\n{s['answer']}\n\n" for s in last)


def test_flower_clientapp_trains_causal_lms_as_the_in_process_engine(tiny_llama, instruct_files, tmp_path):
    """The same ClientApp and strategy serve causal LMs: same adapters and held-out loss."""
    from flower_support import LocalGrid

    from fedlora.engine import Server, Simulator, build_experiment
    from fedlora.flower import client_app as client_module
    from fedlora.flower.run_config import config_from_run_config, run_config_entries
    from fedlora.flower.server_app import flower_engine

    over = causal_overrides(tiny_llama, instruct_files, tmp_path, fed__method="hexa")
    (tmp_path / "inproc").mkdir()
    sim = Simulator(build_experiment(load_config(None, over)), tmp_path / "inproc")
    want = sim.run()
    run_config = run_config_entries(load_config(None, over))
    server = Server(build_experiment(config_from_run_config(run_config)), tmp_path / "flower")
    (tmp_path / "flower").mkdir()
    got = flower_engine(LocalGrid(client_module.app, run_config, 3))(server, server.initial_state())
    for name, a in want.adapters.items():
        torch.testing.assert_close(got.adapters[name].B, a.B, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.adapters[name].A, a.A, atol=1e-5, rtol=1e-4)
    assert [r["eval_loss"] for r in server.rounds] == pytest.approx([r["eval_loss"] for r in sim.rounds], rel=1e-5)


# ------------------------------------------------------------------- GLUE as prompts
def test_glue_tasks_become_label_word_instructions():
    from fedlora.data import TextDataset, get_task
    from fedlora.data.prompts import glue_as_instructions

    sst = glue_as_instructions(get_task("sst2"), TextDataset(["a fun film", "dull"], None, [1, 0], ["negative", "positive"]))
    assert sst.responses == ["positive", "negative"] and sst.prompts[0][0]["content"].endswith("\n\na fun film")
    sts = glue_as_instructions(get_task("stsb"), TextDataset(["x", "y"], ["x", "z"], [4.6, 0.2]))
    assert sts.responses == ["5", "0"] and sts.labels.tolist() == [5, 0] and sts.prompts[1][0]["content"].endswith("y\nz")
    wnli = glue_as_instructions(get_task("wnli"), TextDataset(["a"], ["b"], [1], ["not_entailment", "entailment"]))
    assert wnli.responses == ["yes"]


def test_label_word_scores_and_metrics_against_per_pair_log_likelihoods():
    from fedlora.data import get_task
    from fedlora.data.prompts import prompt_metrics
    from fedlora.engine.evaluate import label_word_scores

    model, tok = tiny_causal_lm("llama")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 40, (n,), generator=g).tolist() for n in (7, 3, 11)]
    answers = [[[41, 3], [42, 3]], [[41, 3], [42, 3]], [[41, 3], [42, 3]]]
    got = label_word_scores(model, prompts, answers, batch_size=4, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for k, a in enumerate(answers[i]):
                seq = torch.tensor([p + a])
                logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
                want = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a))
                assert got[i, k] == pytest.approx(want, abs=1e-4)
    # STS-B: the expected bin under softmax(s); classes: argmax.
    s = np.log(np.array([[0.1, 0.2, 0.3, 0.2, 0.1, 0.1], [0.0 + 1e-9, 0, 0, 0, 0, 1.0]]) + 1e-12)
    m = prompt_metrics(get_task("stsb"), s, np.array([2.4, 5.0]))
    assert set(m) == {"pearson", "spearman"}
    acc = prompt_metrics(get_task("sst2"), np.array([[0.0, -1.0], [-2.0, -0.5], [-1.0, 0.0]]), np.array([0, 1, 0]))
    assert acc["accuracy"] == pytest.approx(2 / 3)


def test_sst2_as_prompts_run_reports_accuracy_from_label_words(tiny_llama, tmp_path):
    over = [
        f"model.name={tiny_llama}",
        "model.rank=4",
        "model.max_length=64",
        "data.task=sst2",
        "data.as_prompt=true",
        f"data.data_dir={GLUE}",
        "data.max_train_examples=60",
        "data.max_eval_examples=20",
        "data.sample_prompts=1",
        "data.sample_tokens=3",
        "partition.num_clients=2",
        "fed.rounds=1",
        "fed.method=fedex",
        "train.batch_size=8",
        "progress=false",
        "threads=1",
        f"output_dir={tmp_path}",
        "name=prompt",
        "model.export_rank=512",  # above every module's rank: the export is exact, and evaluated as a user loads it
    ]
    summary = run_experiment(load_config(None, over), plots=False)
    row = read_jsonl(tmp_path / "prompt" / "metrics.jsonl")[-1]
    assert summary["primary_metric"] == "accuracy" and 0.0 <= row["eval_accuracy"] <= 1.0
    assert row["eval_accuracy"] * 20 == pytest.approx(round(row["eval_accuracy"] * 20))  # a count over 20 examples
    assert "eval_loss" in row and "eval_perplexity" in row
    # the exported folder, reloaded, is scored as the rounds were: label-word accuracy included (it was absent)
    exported = summary["export_metrics"]
    assert exported["accuracy"] == row["eval_accuracy"] and exported["loss"] == pytest.approx(row["eval_loss"], rel=1e-4)


def test_label_words_the_tokenizer_cannot_tell_apart_are_refused(tiny_llama, tmp_path, capsys, monkeypatch):
    from fedlora.data import prompts as prompt_module

    monkeypatch.setitem(prompt_module.PROMPTS, "sst2", prompt_module.PromptTemplate("is it good", ("zzzz", "qqqq")))
    out = tmp_path / "runs"
    over = [
        f"model.name={tiny_llama}",
        "model.max_length=64",
        "data.task=sst2",
        "data.as_prompt=true",
        f"data.data_dir={GLUE}",
        "data.max_train_examples=20",
        "data.max_eval_examples=4",
        "partition.num_clients=2",
        f"output_dir={out}",
    ]
    code = cli.main(["run", *over])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("fedlora: error:") and "cannot tell the classes apart" in err and "zzzz" in err
    assert not out.exists()


def test_a_long_sample_prompt_is_cut_to_leave_room_for_its_answer(tmp_path):
    """GPT-2 has absolute positions (tiny: 128). A sample prompt was sent to generate() uncut: one longer than the
    positions crashed the first evaluation, before round 1's checkpoint (so no resume got past it). Now each is
    its last min(model.max_length, positions − data.sample_tokens) tokens, as training cuts its prompts."""
    from fedlora.engine import build_experiment

    root = tmp_path / "gpt2"
    model, tok = tiny_causal_lm("gpt2")
    model.save_pretrained(root)
    tok.save_pretrained(root)
    words = " ".join(["good"] * 150)
    train, long_eval = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps({"instruction": f"say {w}", "output": w, "category": w}) + "\n" for w in ("good", "bad") * 10))
    rows = [{"instruction": words, "output": "good", "category": "good"}, {"instruction": "say bad", "output": "bad", "category": "bad"}]
    long_eval.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = causal_overrides(root, (train, long_eval), tmp_path / "runs", partition__scheme="iid", fed__rounds=1)
    cfg = load_config(None, [*over, "model.max_length=100", "data.sample_tokens=40", "name=r"])
    exp = build_experiment(cfg)
    assert len(exp.sample_prompts[0][1]) == 128 - 40  # positions − sample_tokens < max_length
    summary = run_experiment(cfg, plots=False, export=False)
    assert summary["rounds"] == 1


def test_generation_stops_at_the_tokenizers_eos_that_training_appends():
    """Training ends every answer with the tokenizer's EOS; a generation config naming another id
    (as hub models' may) must not make greedy answers run on to max_new_tokens past it."""
    from fedlora.engine.evaluate import generate_answers

    model, tok = tiny_causal_lm("llama")
    eos = tok.eos_token_id
    other = next(i for i in range(len(tok)) if i not in (eos, tok.pad_token_id))
    model.generation_config.eos_token_id = other
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():  # every step's greedy choice is the tokenizer's EOS
        head.weight.zero_()
        head.bias.zero_()
        head.bias[eos] = 10.0
    model.lm_head = head
    lengths = []
    generate = model.generate
    model.generate = lambda **kw: (y := generate(**kw), lengths.append(y.shape[1] - kw["input_ids"].shape[1]))[0]
    assert generate_answers(model, tok, [[2, 7, 8]], max_new_tokens=6) == [""]
    assert lengths == [1]
