"""A run folder's life: what `fedlora run` may delete, what it refuses to mix, how it resumes and
re-exports. Each case is a way a user lost or mixed results before (found by review)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil

import pytest
import torch
from engine_support import overrides, tiny_models  # noqa: F401  (fixture)

from fedlora import cli
from fedlora.config import ConfigError, load_config
from fedlora.engine.run import run_experiment


def _run(argv, capsys):
    code = cli.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def _cfg_args(tiny_models, out, **kw):  # noqa: F811
    return overrides(tiny_models["bert"], out, **{"fed__rounds": 1, "data__max_train_examples": 40, "data__max_eval_examples": 20, **kw})


def test_a_name_that_leaves_output_dir_is_refused_and_overwrite_deletes_nothing_outside(tiny_models, tmp_path, capsys):  # noqa: F811
    """`name=..` with --overwrite removed output_dir's parent and every other run in it."""
    runs = tmp_path / "runs"
    (runs / "other-run").mkdir(parents=True)
    (runs / "other-run" / "summary.json").write_text("{}")
    (tmp_path / "precious.txt").write_text("keep")
    for name in ("..", ".", "a/../../x", "/tmp/elsewhere"):
        code, err = _run(["run", *_cfg_args(tiny_models, runs, name=name), "--overwrite"], capsys)
        assert code == 2 and len(err) == 1 and "name must be one folder name" in err[0], err
    assert (tmp_path / "precious.txt").read_text() == "keep" and (runs / "other-run" / "summary.json").exists()


def test_overwrite_never_deletes_a_folder_another_run_holds(tiny_models, tmp_path, capsys):  # noqa: F811
    """--overwrite deleted the folder before taking its lock: a second run then locked a new folder at the same
    path and both wrote into it. Now the lock comes first: the second run is refused and nothing is deleted."""
    out = tmp_path / "runs"
    run_dir = out / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"the first run's")
    fd = os.open(run_dir, os.O_RDONLY)  # the first run, holding the folder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = _run(["run", *_cfg_args(tiny_models, out, name="r"), "--overwrite"], capsys)
    finally:
        os.close(fd)
    assert code == 2 and "another fedlora process is running" in err[0], err
    assert (run_dir / "checkpoint.pt").read_bytes() == b"the first run's"


def test_a_kept_run_without_its_checkpoint_refuses_another_configuration_by_key(tiny_models, tmp_path, capsys):  # noqa: F811
    """Git keeps summary.json, config.yaml and metrics.jsonl of a finished cell. A run of another configuration
    under its name started fresh, rewrote config.yaml and left the old summary: the grid then reported the old
    run's result for the new configuration. Now it is refused, naming the key, and the kept files stay as they were."""
    out = tmp_path / "runs"
    assert _run(["run", *_cfg_args(tiny_models, out, name="cell")], capsys)[0] == 0
    run_dir = out / "cell"
    for item in run_dir.iterdir():
        if item.name not in ("summary.json", "config.yaml", "metrics.jsonl"):
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    kept = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    code, err = _run(["run", *_cfg_args(tiny_models, out, name="cell", train__lr=5e-2)], capsys)
    assert code == 2 and len(err) == 1 and "different configuration (train.lr:" in err[0] and "0.05" in err[0], err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == kept
    # the same configuration runs again from round 0: its own summary, none left from before while it runs
    assert _run(["run", *_cfg_args(tiny_models, out, name="cell")], capsys)[0] == 0
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 1


def test_a_stopped_run_leaves_no_summary_that_looks_finished(tiny_models, tmp_path, monkeypatch):  # noqa: F811
    """A run resumed (or restarted) over a folder with a summary.json, then stopped, left that summary: the grid
    takes a summary as a finished cell. The summary is removed when the run starts, written again at its end."""
    from fedlora.engine.server import Server

    cfg = load_config(None, _cfg_args(tiny_models, tmp_path / "runs", name="r", fed__rounds=2))
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text('{"rounds": 2}')

    class Stopped(RuntimeError):
        pass

    def stop(self, state):
        raise Stopped

    monkeypatch.setattr(Server, "checkpoint", stop)
    with pytest.raises(Stopped):
        run_experiment(cfg, plots=False)
    assert not (run_dir / "summary.json").exists()


def test_a_resume_keeps_the_precision_the_run_started_in(tiny_models, tmp_path, monkeypatch):  # noqa: F811
    """`train.precision: auto` resolves per machine: a resume elsewhere trained its last rounds in another
    arithmetic and reported only that one. The checkpoint records what auto resolved to; a resume keeps it."""
    from fedlora.engine.server import Server

    cfg = load_config(None, _cfg_args(tiny_models, tmp_path / "runs", name="r", fed__rounds=2, train__device="cpu"))
    real = Server.checkpoint

    class Stopped(RuntimeError):
        pass

    def stop_after_round_one(self, state):
        real(self, state)
        raise Stopped

    with monkeypatch.context() as mp:
        mp.setattr(Server, "checkpoint", stop_after_round_one)
        with pytest.raises(Stopped):
            run_experiment(cfg, plots=False, export=False)
    ckpt_path = tmp_path / "runs" / "r" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    here = ckpt["precision"]
    assert here in ("fp32", "bf16")
    other = "bf16" if here == "fp32" else "fp32"  # as if round 1 had run on a machine that resolved auto otherwise
    ckpt["precision"] = other
    torch.save(ckpt, ckpt_path)
    summary = run_experiment(cfg, plots=False, export=False)
    assert summary["hardware"].endswith(f", {other}") and summary["rounds"] == 2
    assert torch.load(ckpt_path, weights_only=True)["precision"] == other


def test_a_clone_elsewhere_resumes_its_kept_runs(tiny_models, tmp_path, capsys):  # noqa: F811
    """config.yaml stores data.data_dir as an absolute path: every kept run was "another configuration" in a
    clone at another path. Where the data lies is not a result setting."""
    out = tmp_path / "runs"
    args = _cfg_args(tiny_models, out, name="cell")
    assert _run(["run", *args], capsys)[0] == 0
    data_dir = next(a.split("=", 1)[1] for a in args if a.startswith("data.data_dir="))
    (tmp_path / "elsewhere").symlink_to(data_dir)
    moved = [a if not a.startswith("data.data_dir=") else f"data.data_dir={tmp_path / 'elsewhere'}" for a in args]
    code, err = _run(["run", *moved], capsys)
    assert code == 0, err


def test_a_round_every_client_fails_is_one_line_and_exit_1(tiny_models, tmp_path, capsys):  # noqa: F811
    """Every update beyond fed.max_update_norm: no client finished round 1 (a traceback before)."""
    code, err = _run(["run", *_cfg_args(tiny_models, tmp_path / "runs", fed__max_update_norm=1e-12)], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("fedlora: error: round 1: no sampled client finished"), err


def test_a_damaged_adapter_is_a_one_line_merge_error(tiny_models, tmp_path, capsys):  # noqa: F811
    """A re-export stopped halfway left a truncated safetensors file under a finished summary (export now writes
    beside the old folder and swaps it in); merge of such a folder printed a SafetensorError traceback."""
    out = tmp_path / "runs"
    assert _run(["run", *_cfg_args(tiny_models, out, name="r")], capsys)[0] == 0
    weights = out / "r" / "adapter" / "adapter_model.safetensors"
    assert not (out / "r" / "adapter.partial").exists()
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = _run(["merge", str(out / "r"), str(tmp_path / "merged")], capsys)
    assert code == 2 and len(err) == 1 and "cannot be read" in err[0] and "re-export" in err[0], err


def test_settings_that_cannot_be_right_are_refused_before_any_folder(tmp_path):
    for setting, words in [
        ("seed=-1", "seed must be ≥ 0"),
        ("train.lr=inf", "train.lr must be a finite number"),
        ("privacy.delta=nan", "privacy.delta must be a finite number"),
        ("train.eval_batch_size=0", "train.eval_batch_size must be ≥ 1"),
        ("train.weight_decay=-5", "train.weight_decay must be ≥ 0"),
    ]:
        with pytest.raises(ConfigError, match=words):
            load_config(None, [setting, f"output_dir={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs").exists()
