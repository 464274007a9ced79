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
