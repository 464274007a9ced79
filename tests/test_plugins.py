"""Methods of one's own (README "A method of your own"): the README's example method and its
test, by file path, module path and entry point, in both engines and in `fedlora compare`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from engine_support import overrides, read_jsonl, tiny_models  # noqa: F401

from fedlora import cli
from fedlora.core import AggregationError, available_methods, get_aggregator

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_method.py"


def _readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## A method of your own", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_readme_shows_the_example_file_and_its_test_passes(monkeypatch):
    method, test = _readme_blocks()
    assert method == EXAMPLE.read_text(), "README's method is examples/my_method.py, verbatim"
    assert len(method.splitlines()) <= 35
    monkeypatch.chdir(ROOT)
    exec(compile(test, "README.md", "exec"), {})


def test_a_plugin_by_module_path_and_by_entry_point(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "methods.py").write_text(EXAMPLE.read_text())
    dist = tmp_path / "mypkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fedlora.methods]\nsvdfold = mypkg.methods:SVDFold\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert type(get_aggregator("mypkg.methods:SVDFold")).__name__ == "SVDFold"
    assert "svdfold" in available_methods()
    assert type(get_aggregator("svdfold")).__name__ == "SVDFold"


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nosuch.module:X", "cannot load method"),
        ("examples/none.py:X", "does not exist"),
        (f"{EXAMPLE}:Nope", "AttributeError"),
        ("fedlora.core:Factored", "not a subclass of fedlora.core.Aggregator"),
        ("nosuchmethod", "unknown aggregation method"),
    ],
)
def test_bad_plugins_are_one_clear_error(spec, message):
    with pytest.raises(AggregationError, match=message):
        get_aggregator(spec)


def test_a_plugin_runs_in_both_engines_and_in_compare(tiny_models, tmp_path, monkeypatch):
    from test_flower import run_flower, run_in_process

    spec = f"{EXAMPLE}:SVDFold"
    over = overrides(tiny_models["bert"], tmp_path / "run", fed__method=spec)
    assert cli.main(["run", *over]) == 0
    (run,) = [p for p in (tmp_path / "run").iterdir() if p.is_dir()]
    assert run.name == "sst2-my_method.py_SVDFold-iid-s0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == spec and len(read_jsonl(run / "metrics.jsonl")) == 3
    # Flower (the same ClientApp and strategy) against the in-process engine
    (tmp_path / "flower").mkdir()
    over = overrides(tiny_models["bert"], tmp_path / "flower", fed__method=spec)
    sim, want = run_in_process(over, tmp_path / "flower")
    server, got, _ = run_flower(over, tmp_path / "flower")
    for name, a in want.adapters.items():
        torch.testing.assert_close(got.adapters[name].delta().dense(), a.delta().dense(), atol=1e-5, rtol=1e-4)
    # fedlora compare, beside a built-in method
    monkeypatch.chdir(ROOT)
    base = overrides(tiny_models["bert"], tmp_path / "grid", fed__rounds=1)
    argv = ["compare", *base, "--methods", "fedex,examples/my_method.py:SVDFold", "--out", str(tmp_path / "report")]
    assert cli.main(argv) == 0
    assert "| examples/my_method.py:SVDFold |" in (tmp_path / "report" / "results.md").read_text()
