"""The benchmark scripts README lists: each exists, parses, and refuses a part it does not know.
(The grids themselves run for hours; their cells are `fedlora compare` runs, tested elsewhere.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

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
