"""The benchmark scripts README lists: each exists, parses, and refuses a part it does not know.
(The grids themselves run for hours; their cells are `fedlora compare` runs, tested elsewhere.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SCRIPTS = sorted(set(re.findall(r"^bash (benchmarks/[\w.-]+\.sh)", README, flags=re.M)))


def test_readme_lists_the_grids():
    assert {"benchmarks/evidence_grid.sh", "benchmarks/dp_grid.sh", "benchmarks/fedex_table3.sh"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_exists_and_parses(script):
    assert (ROOT / script).is_file(), f"README names {script}, which does not exist"
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


@pytest.mark.parametrize("script", ["benchmarks/evidence_grid.sh", "benchmarks/dp_grid.sh"])
def test_grid_scripts_refuse_an_unknown_part(script):
    done = subprocess.run(["bash", str(ROOT / script), "no-such-part"], capture_output=True, text=True)
    assert done.returncode != 0 and "no-such-part" in done.stderr


# The evidence issue's grids, counted from its text: SST-2 × 3 partitions × (9 methods) × 5 seeds plus
# one centralized run per seed; STS-B/RTE × 2 partitions × 5 methods × 5 seeds plus centralized; ranks
# 5 methods × 2 partitions; quantity 9 methods; the ablation's 10 rows (docs/hexa.md); the newer methods' 6 × 2.
# The privacy issue's: local DP-SGD, 5 methods × ε ∈ {1, 3, 6, ∞} × 3 seeds; client-level, 3 methods × ε ∈ {1, 8, ∞} × 3 seeds.
EVIDENCE = {
    "sst2": 3 * 9 * 5 + 5,
    "stsb": 2 * 5 * 5 + 5,
    "rte": 2 * 5 * 5 + 5,
    "ranks": 5 * 2 * 5,
    "quantity": 9 * 5,
    "ablation": 10 * 5,
    "newer": 6 * 2 * 5,
    "centralized": 5,
}
EXPECTED_RUNS = [("evidence_grid", part, n) for part, n in sorted(EVIDENCE.items())] + [("dp_grid", "local", 5 * 4 * 3), ("dp_grid", "client", 3 * 3 * 3)]


@pytest.mark.parametrize("script,part,runs", EXPECTED_RUNS)
def test_grid_status_lists_the_whole_grid_and_runs_nothing(script, part, runs):
    """STATUS=1: every run of the part listed (its state, whatever this checkout holds), nothing run."""
    import os
    import sys

    env = {**os.environ, "STATUS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / f"benchmarks/{script}.sh"), part], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"({runs} runs)" in done.stdout, done.stdout[-500:]


def _status(part: str, **env_vars: str) -> subprocess.CompletedProcess:
    import os
    import sys

    env = {**os.environ, "STATUS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env_vars}
    return subprocess.run(["bash", str(ROOT / "benchmarks/evidence_grid.sh"), part], capture_output=True, text=True, env=env, timeout=120)


def test_only_picks_methods_and_keeps_their_options():
    """ONLY=hexa,fedex: those methods' cells (with options holding commas) and no other; a name that
    picks nothing is refused."""
    done = _status("sst2", ONLY="hexa,fedex", SEEDS="0,1")
    assert done.returncode == 0, done.stderr
    assert "(12 runs)" in done.stdout  # 2 methods × 3 partitions × 2 seeds
    assert "fedit" not in done.stdout and "centralized" not in done.stdout
    done = _status("ablation", ONLY="hexa", SEEDS="0")
    assert done.returncode == 0, done.stderr
    assert "(8 runs)" in done.stdout and "hexa_drift_beta=0_train.lr=1e-3" in done.stdout  # the 8 hexa rows
    done = _status("ablation", ONLY="nope")
    assert done.returncode != 0 and "ONLY=nope names none" in done.stderr


def test_grid_runs_are_kept_where_git_keeps_what_compare_reads_back():
    """Grids run in pieces across sessions and clones: their folders live under results/runs, where git keeps
    a run's summary.json, config.yaml and metrics.jsonl (all `fedlora compare` reads back) and nothing else."""
    import shutil

    import yaml

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for recipe in ["sst2", "stsb", "rte"]:
        out = yaml.safe_load((ROOT / f"benchmarks/recipes/{recipe}.yaml").read_text())["output_dir"]
        assert out.startswith("results/runs/"), (recipe, out)
    for script in ["dp_grid", "evidence_grid"]:
        dirs = re.findall(r"output_dir=(\S+)", (ROOT / f"benchmarks/{script}.sh").read_text())
        assert dirs and all(d.startswith("results/runs/") for d in dirs), (script, dirs)
    run = "results/runs/some-grid/compare-sst2-hexa_train.lr=1e-3-dirichlet_0.1-s0"
    kept = ["summary.json", "config.yaml", "metrics.jsonl"]
    dropped = ["clients.jsonl", "metrics.csv", "checkpoint.pt", "label_histogram.png", "adapter/adapter_model.safetensors"]
    paths = [f"{run}/{f}" for f in kept + dropped] + ["runs/x/summary.json", "examples/runs/x/summary.json"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    ignored = set(done.stdout.split())
    assert ignored == set(paths) - {f"{run}/{f}" for f in kept}, ignored


def test_keep_runs_stages_finished_runs_only(tmp_path):
    """benchmarks/keep_runs.sh in a repository with this .gitignore: a finished run's three read-back files are
    staged; an unfinished run (no summary.json) and every other file of either are not."""
    import shutil

    if shutil.which("git") is None:
        pytest.skip("no git")
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    shutil.copy(ROOT / "benchmarks/keep_runs.sh", tmp_path / "benchmarks/keep_runs.sh")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    finished = tmp_path / "results/runs/grid/compare-sst2-hexa[drift_beta=0]-iid-s0"
    stopped = tmp_path / "results/runs/grid/compare-sst2-fedit-iid-s0"
    for run, files in [
        (finished, ["summary.json", "config.yaml", "metrics.jsonl", "clients.jsonl", "checkpoint.pt"]),
        (stopped, ["config.yaml", "metrics.jsonl", "checkpoint.pt"]),
    ]:
        run.mkdir(parents=True)
        for f in files:
            (run / f).write_text("{}")
    done = subprocess.run(["bash", "benchmarks/keep_runs.sh"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "1 finished runs staged" in done.stdout
    staged = subprocess.run(["git", "diff", "--cached", "--name-only"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split("\n")
    rel = finished.relative_to(tmp_path).as_posix()
    assert sorted(s for s in staged if s) == sorted(f"{rel}/{f}" for f in ["config.yaml", "metrics.jsonl", "summary.json"])


@pytest.mark.parametrize("script,part,runs", [("dp_grid", "local", 5 * 4 * 3), ("evidence_grid", "sst2", EVIDENCE["sst2"])])
def test_shards_of_a_grid_list_every_run_once(script, part, runs):
    """SHARD=K/N (with STATUS=1: listed, nothing run): three machines' shares hold every run of the part once."""
    import os
    import sys

    listed: list[str] = []
    for k in (1, 2, 3):
        env = {**os.environ, "STATUS": "1", "SHARD": f"{k}/3", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        done = subprocess.run(["bash", str(ROOT / f"benchmarks/{script}.sh"), part], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        share = [line.split(" | ")[0].strip("| ") for line in done.stdout.splitlines() if line.startswith("| compare-")]
        assert f"({len(share)} runs)" in done.stdout and len(share) >= runs // 5  # no machine left (nearly) idle
        listed += share
    assert len(listed) == len(set(listed)) == runs


@pytest.mark.parametrize("script,part", [("dp_grid", "local"), ("evidence_grid", "sst2")])
def test_partial_writes_tables_from_finished_cells_and_runs_nothing(tmp_path, script, part):
    """PARTIAL=1 hands `fedlora compare` --partial (collect the finished cells, run none); seen through a stand-in
    `fedlora` on PATH that records its arguments, so nothing runs or writes into the checkout."""
    import os

    fake = tmp_path / "fedlora"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path}/args\n')
    fake.chmod(0o755)
    env = {**os.environ, "PARTIAL": "1", "SEEDS": "0", "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / f"benchmarks/{script}.sh"), part], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().split("\n")
    assert args[0] == "compare" and "--partial" in args and "--status" not in args


def test_recipe_sweep_reads_finished_runs_back_instead_of_training_them_again(tmp_path):
    """git keeps a finished run's summary and metrics but not its checkpoint, and `fedlora run` without
    a checkpoint would train it again: the sweep runs only the candidates without a summary.json."""
    import json
    import os
    import shutil
    import sys
    import uuid

    tag = f"pytest-{uuid.uuid4().hex[:8]}"
    out = ROOT / "results" / "recipes" / f"sst2-{tag}"
    done_run = out / "sst2-lr1e-3-head1e-2"
    fake = tmp_path / "fedlora"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> {tmp_path}/calls\n')
    fake.chmod(0o755)
    env = {
        **os.environ,
        "LRS": "1e-3 3e-3",
        "HEAD_LRS": "1e-2",
        "TAG": tag,
        "PATH": f"{tmp_path}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    try:
        done_run.mkdir(parents=True)
        from fedlora.config import config_to_dict, load_config

        args = ["fed.mode=centralized", "data.eval_split=holdout", "train.lr=1e-3", "train.head_lr=1e-2", "threads=2"]
        cfg = load_config(ROOT / "benchmarks/recipes/sst2.yaml", [*args, f"output_dir={out}", "name=sst2-lr1e-3-head1e-2"])
        (done_run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        (done_run / "summary.json").write_text(
            json.dumps({"primary_metric": "accuracy", "best": {"accuracy": 0.8}, "best_round": 2, "final": {"accuracy": 0.79}, "train_s": 5.0})
        )
        (done_run / "metrics.jsonl").write_text('{"round": 1, "eval_accuracy": 0.7}\n{"round": 2, "eval_accuracy": 0.8}\n')
        done = subprocess.run(["bash", str(ROOT / "benchmarks/recipe_sweep.sh"), "sst2"], capture_output=True, text=True, env=env, timeout=120)
        # the same folder asked for with other settings: refused, naming the setting, nothing run
        other = subprocess.run(
            ["bash", str(ROOT / "benchmarks/recipe_sweep.sh"), "sst2", "train.epochs=2"],
            capture_output=True,
            text=True,
            env={**env, "LRS": "1e-3"},
            timeout=120,
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().split("\n")
    assert calls.count("run") == 1 and "name=sst2-lr3e-3-head1e-2" in calls and "name=sst2-lr1e-3-head1e-2" not in calls
    assert "sst2-lr1e-3-head1e-2: finished, read back" in done.stderr
    assert "| sst2-lr1e-3-head1e-2 | 0.8000 | 2 | 0.7900 | 0.700 0.800 | 5 |" in done.stdout
    assert other.returncode != 0 and "finished with another train.epochs: give these overrides another TAG" in other.stderr
    assert (tmp_path / "calls").read_text().split("\n").count("run") == 1
