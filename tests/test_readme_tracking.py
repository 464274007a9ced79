"""README's "Dashboards" commands as a user runs them (from the repository root, on the real
MiniLM, a smaller budget appended): the run's rounds reach TensorBoard, W&B and MLflow, and the
README's `tensorboard --logdir` serves them over HTTP."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import time
import urllib.request

import pytest
from test_readme_decoder import BIN, ROOT, readme_block
from test_tracking import mlflow_history, tensorboard_scalars, wandb_history

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_commands_as_in_readme(tmp_path):
    lines = [line for line in readme_block("Dashboards: TensorBoard, W&B, MLflow").splitlines() if line.strip()]
    assert len(lines) == 2
    words = shlex.split(lines[0])
    env = dict(w.split("=", 1) for w in words[: words.index("fedlora")])
    assert env == {"WANDB_MODE": "offline"}
    argv = words[len(env) :]
    small = ["data.max_train_examples=200", "data.max_eval_examples=100", "fed.rounds=2", "progress=false", f"output_dir={tmp_path}"]
    base = {"PATH": f"{BIN}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "WANDB_SILENT": "true"}
    done = subprocess.run([str(BIN / "fedlora"), *argv[1:], *small], cwd=ROOT, capture_output=True, text=True, timeout=600, env={**base, **env})
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = tmp_path / "sst2-tracked"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert tensorboard_scalars(run_dir / "tensorboard")["eval_accuracy"] == [(r["round"], pytest.approx(r["eval_accuracy"], rel=1e-6)) for r in rows]
    assert {step: row["eval_accuracy"] for step, row in wandb_history(run_dir).items()} == {r["round"]: r["eval_accuracy"] for r in rows}
    track = json.loads((run_dir / "track.json").read_text())
    assert mlflow_history(tmp_path, track["mlflow"]["run_id"], "eval_accuracy") == [(r["round"], r["eval_accuracy"]) for r in rows]

    # `tensorboard --logdir runs`, with this test's output_dir for runs/ and a free port
    serve = shlex.split(lines[1].split("#")[0])
    assert serve == ["tensorboard", "--logdir", "runs"]
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "tensorboard"), "--logdir", str(tmp_path), "--port", str(port)], cwd=ROOT, env=base, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        url = f"http://localhost:{port}/data/plugin/scalars/scalars?run=sst2-tracked/tensorboard&tag=eval_accuracy"
        for _ in range(120):
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    served = json.loads(reply.read())
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        else:
            raise AssertionError("tensorboard did not answer in 60 s")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [(step, value) for _, step, value in served] == [(r["round"], pytest.approx(r["eval_accuracy"], rel=1e-6)) for r in rows]
