"""The `fedlora` command line, in process: bad input, `fedlora compare`, config files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from engine_support import GLUE, is_png, overrides, tiny_models  # noqa: F401

from fedlora import cli
from fedlora.config import ConfigError, load_config


# ------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def small_glue(tmp_path_factory) -> Path:
    """A GLUE-layout folder with the first 200/50 rows of the real SST-2 (fast to load)."""
    root = tmp_path_factory.mktemp("glue-small")
    (root / "SST-2").mkdir()
    for split, n in (("train", 200), ("dev", 50)):
        lines = (GLUE / "SST-2" / f"{split}.tsv").read_text().splitlines()[: n + 1]
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def bad_glue(tmp_path_factory) -> Path:
    """SST-2 with a malformed row (three columns) on line 4 of train.tsv."""
    root = tmp_path_factory.mktemp("glue-bad")
    (root / "SST-2").mkdir()
    rows = ["sentence\tlabel", "a good movie\t1", "a bad movie\t0", "broken row\t1\textra", "fun\t1"]
    (root / "SST-2" / "train.tsv").write_text("\n".join(rows) + "\n")
    (root / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngreat\t1\nawful\t0\n")
    return root


def _assert_refused(capsys, out: Path, argv: list[str], *needles: str) -> str:
    code = cli.main(argv)
    captured = capsys.readouterr()
    err = captured.err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("fedlora: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists(), f"a refused run created {sorted(p.name for p in out.rglob('*'))}"
    return lines[0]


BAD_OVERRIDES = {
    # id: (overrides, words the message must contain)
    "unknown-task": ({"data__task": "nosuchtask"}, ["unknown GLUE task", "nosuchtask"]),
    "unknown-method": ({"fed__method": "nosuchmethod"}, ["unknown aggregation method", "nosuchmethod"]),
    "bad-method-option": ({"fed__options": "{nosuchoption: 1}"}, ["bad options for method", "nosuchoption"]),
    "unknown-model-name": ({"model__name": "nosuchmodel"}, ["unknown model", "nosuchmodel"]),
    "missing-model-folder": ({"model__name": "/nonexistent/tiny-bert"}, ["does not exist"]),
    "more-clients-than-examples": ({"partition__num_clients": 30, "data__max_train_examples": 20}, ["num_clients=30", "20"]),
    "alpha-zero": ({"partition__scheme": "dirichlet", "partition__alpha": 0}, ["partition.alpha must be > 0"]),
    "alpha-negative": ({"partition__scheme": "dirichlet", "partition__alpha": -1}, ["partition.alpha must be > 0"]),
    "pathological-too-many-labels": ({"partition__scheme": "pathological", "partition__labels_per_client": 3}, ["labels_per_client"]),
    "rank-zero": ({"model__rank": 0}, ["model.rank must be ≥ 1"]),
    "client-rank-above-rank": ({"model__client_ranks": "[8,2]"}, ["client_ranks", "exceed"]),
    "rank-above-module-size": ({"model__rank": 64}, ["rank 64", "32"]),
    "mixed-ranks-for-fedex": ({"fed__method": "fedex", "model__client_ranks": "[4,2]"}, ["fedex", "needs every client"]),
    "max-length-above-positions": ({"model__max_length": 128}, ["model.max_length=128", "64"]),
    "unknown-config-key": ({"train__lrr": 0.1}, ["unknown config key", "train.lrr"]),
    "unknown-section": ({"optim__lr": 0.1}, ["unknown config key", "optim"]),
    "wrong-type": ({"train__lr": "abc"}, ["train.lr", "number", "abc"]),
    "wrong-type-int": ({"fed__rounds": "two"}, ["fed.rounds", "integer"]),
    "fraction-zero": ({"fed__fraction": 0}, ["fed.fraction"]),
    "bad-mode": ({"fed__mode": "solo"}, ["fed.mode"]),
    "device-absent": ({"train__device": "cuda"}, ["train.device='cuda'", "no CUDA device"]),
    "device-unknown": ({"train__device": "tpu"}, ["train.device", "tpu"]),
    "precision-unknown": ({"train__precision": "int4"}, ["train.precision", "int4"]),
    "fp16-on-cpu": ({"train__device": "cpu", "train__precision": "fp16"}, ["fp16 needs a GPU", "bf16"]),
    "quantization-without-cuda": ({"train__device": "cpu", "model__quantization": "4bit"}, ["model.quantization=4bit", "CUDA"]),
    "quantization-8bit-without-cuda": ({"model__quantization": "8bit"}, ["model.quantization=8bit", "CUDA"]),
    "quantization-unknown": ({"model__quantization": "3bit"}, ["model.quantization", "3bit"]),
    "fold-on-quantized": ({"model__quantization": "4bit", "model__base_delta": "fold"}, ["base_delta=fold", "quantized"]),
    "base-delta-unknown": ({"model__base_delta": "lazy"}, ["model.base_delta", "lazy"]),
    # the nodes' own rows are Flower's: in-process there are none, and what needs the server's training set is refused
    "node-data-in-process": ({"data__node_data": "true"}, ["data.node_data=true", "run on Flower"]),
    "node-data-holdout": ({"data__node_data": "true", "data__eval_split": "holdout"}, ["data.node_data=true", "data.eval_split=dev"]),
    "node-data-eval-clients": ({"data__node_data": "true", "fed__eval_clients": "true"}, ["data.node_data=true", "fed.eval_clients"]),
    "node-data-centralized": ({"data__node_data": "true", "fed__mode": "centralized"}, ["data.node_data=true", "fed.mode=centralized"]),
    "node-data-file-without-classes": ({"data__node_data": "true", "data__task": "file"}, ["data.node_data=true", "data.label_names"]),
    "class-aware-head-keys-not-the-output-layer": (
        {"fed__method": "hexa", "fed__options": "{class_aware_head: true, head_keys: [classifier.weights]}"},
        ["fed.options.head_keys", "classifier.weights", "classifier.weight"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_OVERRIDES))
def test_bad_override_is_one_error_line(tiny_models, small_glue, tmp_path, capsys, case):
    kw, needles = BAD_OVERRIDES[case]
    out = tmp_path / "runs"
    argv = ["run", *overrides(tiny_models["bert"], out, **{"data__data_dir": small_glue, "data__max_train_examples": 60, **kw})]
    _assert_refused(capsys, out, argv, *needles)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> Path:
    """CSV/JSONL and instruction files, good and bad, for the BAD_FILES cases."""
    root = tmp_path_factory.mktemp("user-files")
    texts = [f"a good movie {i}" for i in range(12)]
    (root / "train.csv").write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(texts)))
    (root / "eval-id-2.csv").write_text("text,label\nfine,0\nfun,2\n")
    (root / "big.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 99999999999999999999}\n')
    (root / "list-text.jsonl").write_text('{"text": ["a", "b"], "label": 1}\n')
    (root / "dup-header.csv").write_text("text,text,label\na,b,1\n")
    chat = "".join(json.dumps({"instruction": f"say {i}", "output": f"ok {i}"}) + "\n" for i in range(12))
    (root / "chat.jsonl").write_text(chat)
    (root / "chat-null.jsonl").write_text(chat + json.dumps({"instruction": None, "output": "x"}) + "\n")
    return root


FILE = {"data__task": "file", "data__train_file": "train.csv", "data__eval_file": "train.csv"}
CHAT = {"data__task": "instruct", "data__train_file": "chat.jsonl", "data__eval_file": "chat.jsonl"}
BAD_FILES = {
    # id: (overrides, file names among them resolved in user_files, words the message must contain)
    "eval-id-beyond-training-ids": ({**FILE, "data__eval_file": "eval-id-2.csv"}, ["eval-id-2.csv:3", "label 2 is no class of the training data", "0..1"]),
    "label-past-int64": ({**FILE, "data__train_file": "big.jsonl"}, ["big.jsonl:2", "too large for a class id"]),
    "text-not-a-string": ({**FILE, "data__train_file": "list-text.jsonl"}, ["list-text.jsonl:1", "column 'text' holds a list"]),
    "csv-header-twice": ({**FILE, "data__train_file": "dup-header.csv"}, ["dup-header.csv:1", "['text'] more than once"]),
    "instruct-holdout": ({**CHAT, "data__eval_split": "holdout"}, ["data.eval_split=holdout", "data.task=instruct"]),
    "instruct-null-field": ({**CHAT, "data__train_file": "chat-null.jsonl"}, ["chat-null.jsonl:13", "'instruction' is null"]),
    "label-skew-of-one-category": ({**CHAT, "partition__scheme": "dirichlet"}, ["scheme 'dirichlet'", "one label", "data.category_field"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_user_file_is_one_error_line(tiny_models, user_files, tmp_path, capsys, case):
    kw, needles = BAD_FILES[case]
    kw = {k: user_files / v if k.endswith("_file") else v for k, v in kw.items()}
    out = tmp_path / "runs"
    _assert_refused(capsys, out, ["run", *overrides(tiny_models["bert"], out, **{"data__max_train_examples": 0, **kw})], *needles)


def test_missing_data_dir(tiny_models, tmp_path, capsys):
    """source local (auto would try the hub: tests/test_cli_paths.py, offline, empty cache)."""
    out = tmp_path / "runs"
    _assert_refused(
        capsys, out, ["run", *overrides(tiny_models["bert"], out, data__source="local", data__data_dir=tmp_path / "no-glue")], "GLUE file not found", "no-glue"
    )


def test_malformed_tsv_row(tiny_models, bad_glue, tmp_path, capsys):
    out = tmp_path / "runs"
    _assert_refused(capsys, out, ["run", *overrides(tiny_models["bert"], out, data__data_dir=bad_glue)], "train.tsv:4", "columns")


def test_model_folder_without_config(tiny_models, small_glue, tmp_path, capsys):
    out = tmp_path / "runs"
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    _assert_refused(capsys, out, ["run", *overrides(empty, out, data__data_dir=small_glue)], "config.json")


def test_missing_config_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _assert_refused(capsys, tmp_path / "runs", ["run", str(tmp_path / "missing.yaml")], "missing.yaml", "does not exist")


@pytest.mark.parametrize(
    "name,text,needle",
    [
        ("broken.yaml", "model: [unclosed\n", "not valid"),
        ("broken.toml", "[model\nrank = 4\n", "not valid"),
        ("list.yaml", "- 1\n- 2\n", "mapping"),
        ("typo.yaml", "model:\n  rnak: 4\n", "model.rnak"),
        ("config.txt", "model: {}\n", ".yaml"),
    ],
)
def test_invalid_config_file(tmp_path, capsys, monkeypatch, name, text, needle):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    path.write_text(text)
    _assert_refused(capsys, tmp_path / "runs", ["run", str(path), f"output_dir={tmp_path / 'runs'}"], needle)


def test_bad_override_syntax(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _assert_refused(capsys, tmp_path / "runs", ["run", "fed.rounds=2", "train.lr"], "train.lr")


# -------------------------------------------------------------------------- compare
METHODS = ["fedex", "hexa[drift_beta=0]", "centralized"]
PARTITIONS = ["iid", "dirichlet:1.0"]


def _spec_of(cfg: dict) -> tuple[str, str]:
    """(method spec, partition spec) of a run, read back from its config.yaml."""
    fed, part = cfg["fed"], cfg["partition"]
    if fed["mode"] == "centralized":
        method = "centralized"
    else:
        method = fed["method"] + ("[" + ",".join(f"{k}={v}" for k, v in fed["options"].items()) + "]" if fed["options"] else "")
    partition = part["scheme"] + (f":{part['alpha']}" if part["scheme"] == "dirichlet" else "")
    return method, partition


def _table(text: str, heading: str) -> list[list[str]]:
    block = text.split(heading, 1)[1].strip().split("\n\n")[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()]


def test_compare_runs_then_collects(tiny_models, tmp_path, capsys, monkeypatch):
    runs, results = tmp_path / "runs", tmp_path / "results"
    base = tmp_path / "base.yaml"  # a config file plus dotted overrides, as a user would
    base.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(tiny_models["bert"]), "rank": 4, "max_length": 64},
                "data": {"data_dir": str(GLUE), "max_train_examples": 40, "max_eval_examples": 16},
                "fed": {"rounds": 3},
                "progress": False,
                "threads": 1,
            }
        )
    )
    argv = [
        "compare",
        str(base),
        "fed.rounds=1",
        "partition.num_clients=2",
        "train.batch_size=8",
        f"output_dir={runs}",
        "--methods",
        ",".join(METHODS),
        "--partitions",
        ",".join(PARTITIONS),
        "--seeds",
        "0",
        "--out",
        str(results),
        "--jobs",
        "2",
    ]
    assert cli.main(argv) == 0
    capsys.readouterr()

    # one run folder per (federated method, partition), and one centralized run (it ignores
    # the partition) serving both columns; read their own files
    folders = sorted(p for p in runs.iterdir() if p.is_dir())
    assert len(folders) == 2 * 2 + 1
    best = {}
    for f in folders:
        cfg = yaml.safe_load((f / "config.yaml").read_text())
        assert cfg["fed"]["rounds"] == 1 and cfg["data"]["max_train_examples"] == 40  # override beat the file
        summary = json.loads((f / "summary.json").read_text())
        method, partition = _spec_of(cfg)
        for p in PARTITIONS if method == "centralized" else [partition]:
            assert (method, p) not in best
            best[(method, p)] = summary["best"]["accuracy"]
    assert set(best) == {(m, p) for m in METHODS for p in PARTITIONS}

    text = (results / "results.md").read_text()
    for heading in ("## Mean over the second half of the rounds", "## Best over rounds", "## Final round"):
        table = _table(text, heading)
        assert table[0] == ["method", *PARTITIONS]
        assert [row[0] for row in table[2:]] == METHODS
        if heading.startswith(("## Best", "## Mean")):  # one round: its second half is that round, the best too
            for row in table[2:]:
                for p, cell in zip(PARTITIONS, row[1:]):
                    assert cell == f"{100 * best[(row[0], p)]:.2f} ± n/a (1)", (row[0], p, cell)  # one seed: no interval
    rows = json.loads((results / "results.json").read_text())
    assert sorted((r["method"], r["partition"], r["seed"]) for r in rows) == sorted((m, p, 0) for m in METHODS for p in PARTITIONS)
    for r in rows:
        assert r["best_accuracy"] == best[(r["method"], r["partition"])]
    assert is_png(results / "results.png")

    # --collect-only re-uses the finished runs: nothing is run again
    stamps = {f: (f / "summary.json").stat().st_mtime_ns for f in folders}

    def no_runs(*a, **k):
        raise AssertionError("--collect-only must not run anything")

    monkeypatch.setattr("fedlora.engine.run.run_experiment", no_runs)
    (results / "results.md").unlink()
    assert cli.main([*argv, "--collect-only"]) == 0
    assert (results / "results.md").read_text() == text
    assert {f: (f / "summary.json").stat().st_mtime_ns for f in folders} == stamps
    assert "results.md" in capsys.readouterr().out

    # --status lists the runs as they stand and runs nothing either: all five finished, and a
    # seed not run yet adds five runs not started, its rounds priced at the finished runs' rate
    assert cli.main([*argv[:-2], "--status", "--seeds", "0,1"]) == 0
    out = capsys.readouterr().out
    assert "5 finished, 5 not started (10 runs)" in out and "5 rounds left" in out and "process-hours" in out
    assert {f.name for f in folders} <= {line.split(" | ")[0].strip("| ") for line in out.splitlines() if "| finished |" in line}
    assert sorted(p for p in runs.iterdir() if p.is_dir()) == folders  # nothing was started

    # a cell with no run, under --collect-only, is an error naming the whole spec (options with commas)
    msg = _assert_refused(
        capsys,
        tmp_path / "nothing-here",
        [*argv[:-2], "--out", str(tmp_path / "nothing-here"), "--collect-only", "--methods", "hexa[restart=lstsq,drift_beta=0]"],
        "no finished run",
    )
    assert "hexa[restart=lstsq,drift_beta=0]" in msg


def test_compare_rejects_bad_specs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _assert_refused(capsys, tmp_path / "results", ["compare", "--partitions", "zipf:2", "--out", str(tmp_path / "results")], "zipf")
    _assert_refused(capsys, tmp_path / "results", ["compare", "--methods", "hexa[drift_beta]", "--out", str(tmp_path / "results")], "drift_beta")
    _assert_refused(capsys, tmp_path / "results", ["compare", "--seeds", "a,b", "--out", str(tmp_path / "results")], "--seeds")


# --------------------------------------------------------------------------- config
def test_yaml_and_toml_files_with_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(
        "seed: 3\nmodel:\n  rank: 2\n  target_modules: [query]\n  client_ranks: [2, 1]\n"
        "fed:\n  method: fedex\n  rounds: 7\n  options: {drift_beta: 0.5}\ntrain:\n  lr: 0.001\n"
    )
    t = tmp_path / "c.toml"
    t.write_text(
        'seed = 3\n[model]\nrank = 2\ntarget_modules = ["query"]\nclient_ranks = [2, 1]\n'
        '[fed]\nmethod = "fedex"\nrounds = 7\n[fed.options]\ndrift_beta = 0.5\n[train]\nlr = 0.001\n'
    )
    j = tmp_path / "c.json"
    j.write_text(
        json.dumps(
            {
                "seed": 3,
                "model": {"rank": 2, "target_modules": ["query"], "client_ranks": [2, 1]},
                "fed": {"method": "fedex", "rounds": 7, "options": {"drift_beta": 0.5}},
                "train": {"lr": 0.001},
            }
        )
    )
    loaded = [load_config(p) for p in (y, t, j)]
    assert loaded[0] == loaded[1] == loaded[2]
    cfg = loaded[0]
    assert (cfg.seed, cfg.model.rank, cfg.model.target_modules, cfg.model.client_ranks) == (3, 2, ["query"], [2, 1])
    assert (cfg.fed.method, cfg.fed.rounds, cfg.fed.options, cfg.train.lr) == ("fedex", 7, {"drift_beta": 0.5}, 0.001)
    assert cfg.train.batch_size == 32 and cfg.partition.scheme == "iid"  # defaults fill the rest

    for path in (y, t):
        cfg = load_config(path, ["train.lr=5e-3", "fed.rounds=2", "model.rank=4", "fed.options={restart: lstsq}"])
        assert (cfg.train.lr, cfg.fed.rounds, cfg.model.rank) == (5e-3, 2, 4)
        assert cfg.fed.options == {"restart": "lstsq"}  # an override replaces the mapping
        assert cfg.fed.method == "fedex" and cfg.seed == 3  # file values not overridden stay


@pytest.mark.parametrize(
    "text,expected",
    [
        ("model.client_ranks=[4,2]", [4, 2]),
        ("model.client_ranks=4,2", [4, 2]),
        ("model.client_ranks=4", [4]),
    ],
)
def test_list_of_ints_override(text, expected):
    assert load_config(None, [text]).model.client_ranks == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("model.target_modules=query,value", ["query", "value"]),
        ("model.target_modules=[c_attn]", ["c_attn"]),
        ("model.target_modules=c_attn", ["c_attn"]),
        ("model.target_modules=[query, key, value]", ["query", "key", "value"]),
        ("model.target_modules=query, value", ["query", "value"]),  # was [query, ' value']: peft silently adapted query alone
    ],
)
def test_list_of_strings_override(text, expected):
    assert load_config(None, [text]).model.target_modules == expected


def test_scalar_overrides():
    cfg = load_config(None, ["progress=false", "fed.eval_clients=true", "train.lr=1e-3", "train.epochs=2", "name=x"])
    assert cfg.progress is False and cfg.fed.eval_clients is True
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.epochs, float) and cfg.name == "x"
    with pytest.raises(ConfigError, match="model.client_ranks"):
        load_config(None, ["model.client_ranks=[4,x]"])
    with pytest.raises(ConfigError, match="progress"):
        load_config(None, ["progress=maybe"])


def test_interrupt_exits_130_with_a_resume_hint(tiny_models, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("fedlora.engine.run.run_experiment", interrupted)
    assert cli.main(["run", *overrides(tiny_models["bert"], tmp_path / "runs")]) == 130
    err = capsys.readouterr().err
    assert err.startswith("fedlora: interrupted") and "resumes" in err and "Traceback" not in err
