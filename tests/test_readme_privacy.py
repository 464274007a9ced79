"""README's "Differential privacy" commands as a user runs them (from the repository root,
on the real MiniLM), with a smaller budget appended: the runs spend at most their target ε."""

from __future__ import annotations

import json
import shlex

import pytest
from test_readme_decoder import BIN, ROOT, readme_block, run

pytestmark = pytest.mark.slow


def test_privacy_commands_as_in_readme(tmp_path):
    block = readme_block("Differential privacy").replace("\\\n", " ")
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert len(commands) == 3 and commands[0][:2] == ["fedlora", "plan"] and all(c[:2] == ["fedlora", "run"] for c in commands[1:])
    small = ["data.max_train_examples=200", "data.max_eval_examples=100", "fed.rounds=2", "progress=false", f"output_dir={tmp_path}"]
    plan, commands = commands[0], commands[1:]
    printed = run([str(BIN / "fedlora"), *plan[1:], *small], ROOT)
    planned = float(printed.rsplit("the run's ε (its most-spending client) after the last round: ", 1)[1].split()[0])
    # the plan is the DP-SGD run's settings without its name: the ε it predicts is the ε that run reports
    (local,) = [c for c in commands if "privacy.mode=local" in c]
    assert plan[2:] == [a for a in local[2:] if not a.startswith("name=")]
    for argv in commands:
        run([str(BIN / "fedlora"), *argv[1:], *small], ROOT)
        name = next(a.split("=", 1)[1] for a in argv if a.startswith("name="))
        target = float(next(a.split("=", 1)[1] for a in argv if a.startswith("privacy.target_epsilon=")))
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert target - 0.05 <= summary["epsilon"] <= target, summary
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"] == summary["epsilon"]
        if summary["privacy"] == "local":
            assert summary["epsilon"] == pytest.approx(planned, rel=1e-3)
