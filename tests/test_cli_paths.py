"""``fedlora run`` as a user starts it, in a subprocess from an unrelated working folder:
the example config finds its data through its own folder and prints no library noise, and
``data.source: auto`` with neither a local copy nor the hub stops with one error line (the
hub forced offline, with an empty cache, so nothing touches the network)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from engine_support import GLUE, tiny_models  # noqa: F401

import fedlora

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sst2_noniid.yaml"
needs_glue = pytest.mark.skipif(not (GLUE / "SST-2").is_dir(), reason=f"local GLUE copy not found at {GLUE}")


def fedlora_run(argv: list[str], cwd: Path, hf_home: Path) -> subprocess.CompletedProcess:
    """``python -m fedlora.cli run ...`` on the fedlora these tests import, offline."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(hf_home),
        PYTHONPATH=os.pathsep.join([str(Path(fedlora.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    )
    return subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "run", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


TINY = [
    "model.rank=4",
    "model.max_length=64",
    "data.max_train_examples=40",
    "data.max_eval_examples=16",
    "partition.num_clients=2",
    "fed.rounds=1",
    "train.epochs=1",
    "train.batch_size=8",
    "progress=false",
    "threads=1",
]


@needs_glue
def test_example_runs_from_any_working_folder(tiny_models, tmp_path):  # noqa: F811
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    done = fedlora_run(
        [str(EXAMPLE), f"model.name={tiny_models['bert']}", *TINY, "name=example"],
        cwd,
        tmp_path / "hf",
    )
    assert done.returncode == 0, done.stderr
    # the example's output_dir, under the working folder
    run_dir = cwd / "runs" / "example"
    assert (run_dir / "summary.json").is_file()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    # data.data_dir ../../shared/data/glue, relative to examples/: the helpers' GLUE
    assert cfg["data"]["data_dir"] == os.path.normpath(GLUE) and cfg["data"]["source"] == "auto"
    assert cfg["output_dir"] == str(cwd / "runs")
    # no library noise a user cannot act on (peft's call of a deprecated transformers property)
    assert "is_gradient_checkpointing" not in done.stderr and "FutureWarning" not in done.stderr, done.stderr


def test_auto_without_local_copy_or_hub_is_one_error_line(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    config = project / "run.yaml"  # data_dir relative to the file, looked for beside it
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"source": "auto", "data_dir": "glue-copy"},
                "output_dir": str(tmp_path / "runs"),
            }
        )
    )
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    done = fedlora_run([str(config), *TINY], cwd, tmp_path / "hf")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("fedlora: error:"), done.stderr
    for needle in (
        f"no local copy of SST-2 at {project / 'glue-copy' / 'SST-2'}",
        "hub is unreachable",
        "data.data_dir",
        "go online",
    ):
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "runs").exists() and not any(cwd.iterdir())
