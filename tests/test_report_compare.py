"""`fedlora compare` bookkeeping without training: tables from hand-written summaries."""

import json
import math

import pytest

from fedlora.config import ConfigError
from fedlora.engine.grid import Cell, collect, parse_method, parse_partition
from fedlora.report.compare import markdown_table


def write_summary(root, name, acc, task="sst2"):
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"task": task, "primary_metric": "accuracy", "best": {"accuracy": acc}, "final": {"accuracy": acc - 0.01}}))


def test_partial_collect_and_table_mean_std(tmp_path):
    over = [f"output_dir={tmp_path}", "data.task=sst2"]
    write_summary(tmp_path, "compare-sst2-hexa-dirichlet_0.1-s0", 0.70)
    write_summary(tmp_path, "compare-sst2-hexa-dirichlet_0.1-s1", 0.80)
    write_summary(tmp_path, "compare-sst2-centralized-s0", 0.90)  # shared by every partition
    write_summary(tmp_path, "compare-rte-fedex-dirichlet_0.1-s0", 0.55, task="rte")  # another task's grid
    cells = [Cell(m, "dirichlet:0.1", s) for m in ("hexa", "fedex", "centralized") for s in (0, 1)]
    with pytest.raises(ConfigError, match="no finished run for fedex"):
        collect(cells, None, over, run=False)
    results = collect(cells, None, over, run=False, skip_missing=True)
    assert len(results) == 3
    table = markdown_table(results, "best")
    sd = math.sqrt(((70 - 75) ** 2 + (80 - 75) ** 2) / 1)
    assert f"| hexa | 75.00 ± {sd:.2f} (2) |" in table
    assert "| centralized | 90.00 ± 0.00 (1) |" in table
    assert "fedex" not in table
    with pytest.raises(ConfigError, match="no finished run for any cell"):
        collect([Cell("fedit", "iid", 0)], None, over, run=False, skip_missing=True)


def test_specs():
    assert parse_method("hexa[restart=svd_sqrt,drift_beta=2]") == ("hexa", {"restart": "svd_sqrt", "drift_beta": 2})
    assert parse_partition("dirichlet:0.1") == ["partition.scheme=dirichlet", "partition.alpha=0.1"]
    with pytest.raises(ConfigError):
        parse_partition("zipf:2")
    with pytest.raises(ConfigError):
        parse_method("hexa[oops]")


def test_runs_of_another_task_are_never_read(tmp_path):
    """Grids over several tasks share output_dir; a folder holding another task's run
    (e.g. renamed by hand) is an error, not a silently wrong table."""
    write_summary(tmp_path, "compare-rte-hexa-iid-s0", 0.60, task="sst2")
    with pytest.raises(ConfigError, match="task 'sst2', not 'rte'"):
        collect([Cell("hexa", "iid", 0)], None, [f"output_dir={tmp_path}", "data.task=rte"], run=False)
