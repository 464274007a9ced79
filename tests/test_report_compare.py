"""`fedlora compare` bookkeeping without training: tables from hand-written summaries."""

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from fedlora.config import ConfigError, config_to_dict, load_config
from fedlora.engine.grid import Cell, collect, grid_overrides, parse_method, parse_partition
from fedlora.engine.run import last_half
from fedlora.report.compare import markdown_table, paired_table, write_report


def write_summary(root, name, acc, task="sst2", metric="accuracy"):
    """A finished cell's folder: its summary and the configuration the grid gives that cell."""
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"task": task, "primary_metric": metric, "best": {metric: acc}, "final": {metric: acc - 0.01}, "train_s": 10.0}))
    named, method, part, seed = re.fullmatch(r"compare-(\w+?)-(.+?)(?:-(iid|dirichlet_[\d.]+))?-s(\d+)", name).groups()
    cell = Cell(method, (part or "iid").replace("dirichlet_", "dirichlet:"), int(seed))
    cfg = load_config(None, grid_overrides(cell, [f"output_dir={root}", f"data.task={named}"], named))
    (d / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


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
    half = 12.7062047 * sd / math.sqrt(2)  # t_{0.975, 1} from a t table
    assert f"| hexa | 75.00 ± {half:.2f} (2) |" in table
    assert "| centralized | 90.00 ± n/a (1) |" in table
    assert "fedex" not in table
    with pytest.raises(ConfigError, match="no finished run for any cell"):
        collect([Cell("fedit", "iid", 0)], None, over, run=False, skip_missing=True)


def test_specs():
    assert parse_method("hexa[restart=svd_sqrt,drift_beta=2]") == ("hexa", {"restart": "svd_sqrt", "drift_beta": 2})
    assert parse_method("hexa[drift_beta=1e-3,server_momentum=.5]") == ("hexa", {"drift_beta": 1e-3, "server_momentum": 0.5})  # YAML 1.1 reads 1e-3 as text
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


def test_a_finished_run_of_another_configuration_is_never_read_as_the_cell(tmp_path):
    """The same cell name under another base setting (a grid re-run with train.lr changed, or a
    sweep on held-out data beside one on dev): refused with the folder named, never reported."""
    write_summary(tmp_path, "compare-sst2-hexa-iid-s0", 0.70)
    over = [f"output_dir={tmp_path}", "data.task=sst2"]
    assert collect([Cell("hexa", "iid", 0)], None, over, run=False)[Cell("hexa", "iid", 0)]["best"]["accuracy"] == 0.70
    with pytest.raises(ConfigError, match="compare-sst2-hexa-iid-s0 holds a run of hexa / iid / seed 0 with a different configuration"):
        collect([Cell("hexa", "iid", 0)], None, [*over, "data.eval_split=holdout"], run=False)
    (tmp_path / "compare-sst2-hexa-iid-s0" / "config.yaml").unlink()  # a folder without one proves nothing either
    with pytest.raises(ConfigError, match="different configuration"):
        collect([Cell("hexa", "iid", 0)], None, over, run=False)


FEDIT = [70.0, 72.0, 68.0, 75.0, 71.0]
HEXA = [71.0, 73.5, 69.0, 76.0, 72.5]  # fedit + [1, 1.5, 1, 1, 1.5] at each seed
FEDEX = [73.0, 69.0, 70.0, 73.0, 71.0]  # fedit + [3, -3, 2, -2, 0]


def _grid(tmp_path, metric="accuracy", scale=100.0):
    for seed in range(5):
        for method, xs in (("fedit", FEDIT), ("hexa", HEXA), ("fedex", FEDEX)):
            write_summary(tmp_path, f"compare-sst2-{method}-iid-s{seed}", xs[seed] / scale, metric=metric)
    cells = [Cell(m, "iid", s) for m in ("fedit", "hexa", "fedex") for s in range(5)]
    return collect(cells, None, [f"output_dir={tmp_path}", "data.task=sst2"], run=False)


def test_paired_differences_by_seed(tmp_path):
    """Hand-computed: d = [1, 1.5, 1, 1, 1.5], mean 1.2, s = √0.075, t_{0.975,4} = 2.776445:
    1.20 ± 0.34, ahead, although hexa's own interval overlaps fedit's (the seeds' spread is shared)."""
    results = _grid(tmp_path)
    table = paired_table(results, "fedit", "best")
    half = 2.776445 * math.sqrt(0.075) / math.sqrt(5)
    assert f"| hexa | 1.20 ± {half:.2f} (5) **ahead** |" in table
    assert "| fedex | 0.00 ±" in table and "fedex | 0.00 ± 3." in table and "ahead" not in table.split("fedex")[1] and "behind" not in table
    means = markdown_table(results, "best")
    assert "| hexa | 72.40 ±" in means and "| fedit | 71.20 ±" in means
    path = write_report(results, tmp_path / "report", "t", baseline="fedit")
    text = path.read_text()
    assert "### Paired difference from fedit (best)" in text and "## Compute per run" in text and (tmp_path / "report" / "results.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="--baseline 'nope'"):
        write_report(results, tmp_path / "report", "t", baseline="nope")


def test_paired_differences_of_a_loss_lower_is_better(tmp_path):
    """Perplexity: a method whose values are lower at every seed is ahead, higher is behind."""
    results = _grid(tmp_path, metric="perplexity", scale=1.0)
    table = paired_table(results, "hexa", "best", scale=1.0)
    assert "| fedit | -1.20 ±" in table and "**ahead**" in table.split("| fedit |")[1].split("\n")[0]
    table = paired_table(results, "fedit", "best", scale=1.0)
    assert "**behind**" in table.split("| hexa |")[1].split("\n")[0]
    # the report shows a perplexity as it is (×1): fedit's mean 71.20, not 7120
    text = write_report(results, tmp_path / "report", "t", baseline="fedit").read_text()
    assert "Cells: perplexity, mean" in text and "| fedit | 71.20 ±" in text and "7120" not in text


def test_a_diverged_run_leaves_its_pairs_without_a_verdict_and_cancels_no_one_elses_call(tmp_path):
    """A method whose seed 0 diverged (NaN) listed first: its pairs are shown on its four finite seeds with the
    divergence noted, but get no test and no verdict (judged on its good seeds only, a method that diverges
    would look better than it is); hexa − fedit stays real (the NaN p once sorted anywhere and pushed every
    Holm p after it to 1)."""
    from scipy.stats import ttest_rel

    from fedlora.report.compare import pairwise_verdicts

    for seed in range(5):
        write_summary(tmp_path, f"compare-sst2-fra-iid-s{seed}", math.nan if seed == 0 else (HEXA[seed] - 20) / 100)
    results = _grid(tmp_path)
    fra = {
        Cell("fra", "iid", s): r
        for s in range(5)
        for r in collect([Cell("fra", "iid", s)], None, [f"output_dir={tmp_path}", "data.task=sst2"], run=False).values()
    }
    results = fra | results  # fra first: before the fix its NaN sorted anywhere and pushed every Holm p to 1
    text = pairwise_verdicts(results, "best")
    p = ttest_rel(HEXA, FEDIT).pvalue
    (row,) = [line for line in text.splitlines() if "| hexa − fedit |" in line]
    assert row.startswith(f"| iid | hexa − fedit | 1.20 ± {2.776445 * math.sqrt(0.075) / math.sqrt(5):.2f} (5) | {p:.2g} |") and row.endswith("| yes |")
    assert "spread: 3 in iid;" in text and "fra" not in text  # the three pairs without fra
    from fedlora.report.compare import markdown_table, paired_table

    # seed 0 left out and counted: d = (HEXA − FEDIT) − 20 at seeds 1–4, its interval shown, no verdict
    assert "| fra | -18.75 ± 0.46 (4; 1 diverged) |" in paired_table(results, "fedit", "best")
    assert "| fra | " + f"{(sum(HEXA[1:]) / 4 - 20):.2f} ± " in markdown_table(results, "best") and "(4; 1 diverged) |" in markdown_table(results, "best")


def test_method_specs_with_config_overrides():
    from fedlora.engine.grid import grid_overrides

    over = grid_overrides(Cell("ffa[train.lr=3e-3]", "dirichlet:0.1", 2), ["data.task=sst2"], "sst2")
    assert "train.lr=3e-3" in over and "fed.method=ffa" in over and "fed.options={}" in over
    assert over[-1] == "name=compare-sst2-ffa_train.lr=3e-3-dirichlet_0.1-s2"
    over = grid_overrides(Cell("hexa[drift_beta=0,train.head_lr=0.01]", "iid", 0), [], "sst2")
    assert "train.head_lr=0.01" in over and 'fed.options={"drift_beta": 0}' in over
    over = grid_overrides(Cell("centralized[train.epochs=2]", "iid", 0), [], "sst2")
    assert "train.epochs=2" in over and "fed.mode=centralized" in over
    with pytest.raises(ConfigError, match="centralized takes config overrides"):
        grid_overrides(Cell("centralized[drift_beta=0]", "iid", 0), [], "sst2")
    from fedlora.config import load_config

    assert load_config(None, grid_overrides(Cell("ffa[train.lr=3e-3]", "iid", 0), [], "sst2")).train.lr == 3e-3


@pytest.mark.parametrize(
    "key,heading",
    [("personal_final", "## Personalised models, final round"), ("received_final", "## The final model on the clients' own examples")],
)
def test_scores_on_the_clients_own_examples_get_their_own_table(tmp_path, key, heading):
    """FedSA-LoRA's figure is the weighted mean of each client's own model, not a global model, and
    federated evaluation scores the final model on the clients' rows, not the evaluation set: each a
    separate table, with – for the methods that were not evaluated so."""
    results = _grid(tmp_path)
    for cell, r in results.items():
        if cell.method == "hexa":
            r[key] = {"accuracy": 0.5 + cell.seed / 100}  # 50, 51, 52, 53, 54
    text = write_report(results, tmp_path / "report", "t", baseline="fedit").read_text()
    section = text.split(heading)[1].split("## Compute")[0]
    assert "| hexa | 52.00 ±" in section and "| fedit | – |" in section
    rows = json.loads((tmp_path / "report" / "results.json").read_text())
    assert {r[f"{key}_accuracy"] for r in rows if r["method"] == "hexa"} == {0.5, 0.51, 0.52, 0.53, 0.54}
    for r in results.values():
        r.pop(key, None)
    assert heading not in write_report(results, tmp_path / "report", "t", baseline="fedit").read_text()


def test_last_half_is_the_mean_of_the_second_half_of_the_evaluated_rounds():
    rows = [{"round": i, "eval_accuracy": a, "eval_f1": a / 2, "eval_s": 9.0} for i, a in enumerate([0.5, 0.6, 0.9, 0.7, 0.8, 0.6, 0.7], 1)]
    assert last_half(rows) == pytest.approx({"accuracy": (0.7 + 0.8 + 0.6 + 0.7) / 4, "f1": (0.7 + 0.8 + 0.6 + 0.7) / 8})  # ⌈7/2⌉ = 4
    assert last_half(rows[:1]) == pytest.approx({"accuracy": 0.5, "f1": 0.25})
    assert last_half(rows[:2]) == pytest.approx({"accuracy": 0.6, "f1": 0.3})
    assert last_half([]) == {}


def test_runs_summarised_before_last_half_get_it_from_their_metrics(tmp_path):
    """Cells finished by an older fedlora have no last_half in summary.json: the grid computes it
    from the run's metrics.jsonl, and the report leads with that table and its paired differences."""
    curves = {"fedit": [[0.5, 0.6, 0.7, 0.8], [0.5, 0.5, 0.6, 0.6]], "hexa": [[0.5, 0.7, 0.8, 0.9], [0.5, 0.6, 0.7, 0.7]]}
    for method, per_seed in curves.items():
        for seed, curve in enumerate(per_seed):
            name = f"compare-sst2-{method}-iid-s{seed}"
            write_summary(tmp_path, name, max(curve))
            rows = [{"round": i, "train_s": 1.0, "eval_accuracy": a} for i, a in enumerate(curve, 1)] + [{"round": 5, "train_s": 1.0}]  # an unevaluated round
            (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cells = [Cell(m, "iid", s) for m in curves for s in (0, 1)]
    results = collect(cells, None, [f"output_dir={tmp_path}", "data.task=sst2"], run=False)
    assert [results[Cell("hexa", "iid", s)]["last_half"]["accuracy"] for s in (0, 1)] == pytest.approx([0.85, 0.70])
    table = paired_table(results, "fedit", "last_half")
    assert "| hexa | 10.00 ± 0.00 (2; no spread) |" in table  # d = [85 − 75, 70 − 60]: no spread, no test, no call (stats.py)
    text = write_report(results, tmp_path / "report", "t").read_text()
    assert text.index("## Mean over the second half of the rounds") < text.index("## Final round") < text.index("## Best over rounds")
    assert "### Paired difference from fedit (last_half)" in text


def test_compute_per_run_never_averages_two_machines():
    """Seconds from a GPU and from a CPU are different quantities: one row per (method, machine)."""
    from fedlora.report.compare import compute_table

    results = {
        Cell("fedit", "iid", 0): {"train_s": 100.0, "train_tokens": 10, "train_steps": 5, "aggregate_s": 0.5, "hardware": "cpu: X, bf16"},
        Cell("fedit", "iid", 1): {"train_s": 300.0, "train_tokens": 10, "train_steps": 5, "aggregate_s": 0.5, "hardware": "cpu: X, bf16"},
        Cell("fedit", "iid", 2): {"train_s": 8.0, "train_tokens": 10, "train_steps": 5, "aggregate_s": 0.5, "hardware": "cuda: H, bf16"},
        Cell("hexa", "iid", 0): {"train_s": 50.0, "train_tokens": 10, "train_steps": 5, "aggregate_s": 0.5},
    }
    rows = [line.split(" | ") for line in compute_table(results).splitlines()[2:]]
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [
        ("| fedit", "cpu: X, bf16", "2", "200", "–"),  # CPU seconds only where every run recorded them
        ("| fedit", "cuda: H, bf16", "1", "8", "–"),
        ("| hexa", "not recorded", "1", "50", "–"),
    ]
    for seed, cpu in ((0, 90.0), (1, 110.0)):
        results[Cell("fedit", "iid", seed)]["train_cpu_s"] = cpu
    assert compute_table(results).splitlines()[2].split(" | ")[3:5] == ["200", "100"]


def test_a_grid_trained_at_two_precisions_says_so(tmp_path):
    """precision auto picks bf16 or fp32 per machine (and per process, by a timing probe): a report
    whose runs differ in it says so before its tables."""
    results = _grid(tmp_path)
    for r in results.values():
        r["hardware"] = "cpu: X, fp32"
    text = write_report(results, tmp_path / "one", "t").read_text()
    assert "more than one precision" not in text
    for c, r in results.items():
        if c.seed == 0:
            r["hardware"] = "cuda: H, bf16"
    text = write_report(results, tmp_path / "two", "t").read_text()
    assert "**The runs trained at more than one precision (bf16: 3 runs, fp32: 12 runs):**" in text


def test_status_lists_each_run_and_the_compute_left(tmp_path):
    """`--status`: finished, stopped after some rounds, not started, and a folder of another
    configuration, each named; the estimate is the rounds left × the finished runs' seconds per round."""
    from fedlora.engine.grid import grid_status, status_table

    over = [f"output_dir={tmp_path}", "data.task=sst2", "fed.rounds=4"]
    cells = [Cell("fedit", "iid", s) for s in range(3)] + [Cell("centralized", "iid", 0), Cell("centralized", "dirichlet:0.1", 0), Cell("hexa", "iid", 0)]
    for name, rounds, extra in [("compare-sst2-fedit-iid-s0", 4, []), ("compare-sst2-hexa-iid-s0", 4, ["train.lr=0.5"])]:
        cfg = load_config(None, grid_overrides(Cell(name.split("-")[2], "iid", 0), [*over, *extra], "sst2"))
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        (d / "summary.json").write_text(json.dumps({"task": "sst2", "hardware": "cpu: X, bf16"}))
        (d / "metrics.jsonl").write_text("".join(json.dumps({"round": i, "train_s": 50.0}) + "\n" for i in range(1, rounds + 1)))
    stopped = tmp_path / "compare-sst2-fedit-iid-s1"
    stopped.mkdir()
    (stopped / "metrics.jsonl").write_text("".join(json.dumps({"round": i, "train_s": 70.0}) + "\n" for i in (1, 2, 3)))
    rows = grid_status(cells, None, over)
    assert [(r["run"], r["state"], r["rounds"]) for r in rows] == [
        ("compare-sst2-fedit-iid-s0", "finished", 4),
        ("compare-sst2-fedit-iid-s1", "running or stopped", 3),
        ("compare-sst2-fedit-iid-s2", "not started", 0),
        ("compare-sst2-centralized-s0", "not started", 0),  # one run for both partitions
        ("compare-sst2-hexa-iid-s0", "other configuration", 4),
    ]
    text = status_table(rows)
    # left: 1 + 4 federated, the centralized run's 4 (at the federated rate: no centralized run finished), and 4 for
    # the other configuration's folder (trained again from round 1) = 13 rounds at 50 s
    assert "1 finished, 1 running or stopped, 2 not started, 1 other configuration (5 runs)" in text
    assert "13 rounds left, ≈ 0.2 process-hours on cpu: X, bf16 (federated: 9 × 50 s from 1 runs; centralized: 4 × 50 s from 1 other-mode runs)" in text
    # a finished centralized run (200 s a round) does not move the federated rounds' rate
    finished = [dict(r) for r in rows]
    finished[3] |= {"state": "finished", "rounds": 4, "train_s": 800.0, "hardware": "cpu: X, bf16"}  # compare-sst2-centralized-s0
    assert "9 rounds left, ≈ 0.1 process-hours on cpu: X, bf16 (federated: 9 × 50 s from 1 runs)" in status_table(finished)
    assert [r["mode"] for r in rows] == ["federated"] * 3 + ["centralized", "federated"]
    # CPU seconds, where every run of the basis recorded them, are the rate (wall time grows with other jobs)
    cpu = [dict(r) for r in rows]
    cpu[0]["cpu_s"] = 120.0  # the finished fedit run: 4 rounds, 30 CPU s each
    assert "13 rounds left, ≈ 0.1 process-hours on cpu: X, bf16 (federated: 9 × 30 CPU s from 1 runs; centralized: 4 × 30 CPU s" in status_table(cpu)


def test_learning_curves_with_bands(tmp_path):
    """collect reads each run's curve from metrics.jsonl; the bands are the mean over seeds at the rounds
    every seed evaluated, with Student's t interval (hand values); write_report draws curves.png."""
    from fedlora.report.compare import round_bands

    over = [f"output_dir={tmp_path}", "data.task=sst2"]
    curves = {0: [0.5, 0.6, 0.7], 1: [0.7, 0.8, None], 2: [0.6, 0.7, 0.8]}  # seed 1 did not evaluate round 3
    for seed, curve in curves.items():
        write_summary(tmp_path, f"compare-sst2-hexa-iid-s{seed}", 0.7)
        rows = [{"round": t, "train_s": 1.0, **({"eval_accuracy": v} if v is not None else {})} for t, v in enumerate(curve, 1)]
        (tmp_path / f"compare-sst2-hexa-iid-s{seed}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = collect([Cell("hexa", "iid", s) for s in curves], None, over, run=False)
    assert results[Cell("hexa", "iid", 1)]["curve"] == [[1, 0.7], [2, 0.8]]
    rounds, ivs = round_bands(results, "iid")["hexa"]
    assert rounds == [1, 2]  # round 3 is missing from one seed
    t2 = 4.30265273  # t_{0.975, 2} from a t table
    for iv, xs in zip(ivs, ([50, 70, 60], [60, 80, 70])):
        mean = sum(xs) / 3
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / 2)
        assert iv.mean == pytest.approx(mean) and iv.half == pytest.approx(t2 * sd / math.sqrt(3)) and iv.n == 3
    write_report(results, tmp_path / "report", "t")
    assert (tmp_path / "report" / "curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "report" / "results.json").read_text())[0]["curve"] == [[1, 0.5], [2, 0.6], [3, 0.7]]


def test_privacy_tables_read_a_dp_grid_by_epsilon(tmp_path):
    """Hand-computed: fedit at ε = 1 minus fedit without DP is −10, −11, −9 (mean −10, s = 1,
    t_{0.975,2} = 4.302653: ± 2.48, behind); ffa minus fedit at ε = 1 is 2, 3, 1 (2.00 ± 2.48: the interval
    holds zero, no verdict); without DP −2 at every seed (± 0.00, behind); hexa minus fedit at ε = 1 is 5, 4, 4
    (4.33 ± 1.43, ahead). Options other than privacy.* stay in the row's name."""
    from fedlora.report.compare import privacy_tables

    def summary(acc, eps=None):
        r = {"primary_metric": "accuracy", "best": {"accuracy": acc}, "final": {"accuracy": acc}, "train_s": 1.0}
        return r | ({"epsilon": eps} if eps is not None else {})

    dp = "privacy.mode=local,privacy.target_epsilon=1"
    accs = {
        "fedit": ([0.80, 0.82, 0.81], None),
        f"fedit[{dp}]": ([0.70, 0.71, 0.72], 0.998),
        "ffa": ([0.78, 0.80, 0.79], None),
        f"ffa[{dp}]": ([0.72, 0.74, 0.73], 0.991),
        f"hexa[drift_beta=0,{dp}]": ([0.75, 0.75, 0.76], 0.998),
    }
    results = {Cell(m, "dirichlet:0.5", s): summary(a, eps) for m, (xs, eps) in accs.items() for s, a in enumerate(xs)}
    text = privacy_tables(results, "fedit")
    half = 4.302653 / math.sqrt(3)
    assert "| method | ε = 1 (spent 0.991–0.998) | ε = ∞ (no DP) |" in text
    only_fedit = {c: r for c, r in results.items() if c.method.startswith("fedit")}
    assert "| method | ε = 1 (spent 0.998) | ε = ∞ (no DP) |" in privacy_tables(only_fedit, "fedit")
    assert f"| fedit | 71.00 ± {half:.2f} (3) | 81.00 ± {half:.2f} (3) |" in text
    assert f"| fedit | -10.00 ± {half:.2f} (3) **behind** | – |" in text
    assert f"| ffa | 2.00 ± {half:.2f} (3) | -2.00 ± 0.00 (3; no spread) |" in text  # the same −2 at every seed: no spread, no call
    assert f"| hexa[drift_beta=0] | 4.33 ± {4.302653 * math.sqrt(1 / 3) / math.sqrt(3):.2f} (3) **ahead** | – |" in text
    assert "| hexa[drift_beta=0] | 75.33 ±" in text and "| hexa[drift_beta=0] | – | – |" in text  # no DP-free hexa run: no cost, no pair
    report = write_report(results, tmp_path / "report", "dp", baseline="fedit").read_text()
    assert "## Privacy–utility" in report and "Each method minus fedit at the same ε" in report


def test_privacy_columns_keep_local_and_client_apart_and_group_a_given_noise():
    """Local and client DP at the same target ε are two columns (they were one: the last written won); a
    spec that gives z instead of a target is one column over its seeds, the ε they spent in its header
    (it was a column per seed, each ε rounded)."""
    from fedlora.report.compare import privacy_tables

    def summary(acc, eps=None):
        r = {"primary_metric": "accuracy", "best": {"accuracy": acc}, "final": {"accuracy": acc}, "train_s": 1.0}
        return r | ({"epsilon": eps} if eps is not None else {})

    accs = {
        "fedit": ([0.80, 0.82, 0.81], None),
        "fedit[privacy.mode=local,privacy.target_epsilon=1]": ([0.70, 0.71, 0.72], [0.998] * 3),
        "fedit[privacy.mode=client,privacy.target_epsilon=1]": ([0.60, 0.61, 0.59], [0.99] * 3),
        "fedit[privacy.mode=local,privacy.noise_multiplier=1]": ([0.75, 0.74, 0.76], [2.013, 2.171, 1.954]),
    }
    results = {Cell(m, "iid", s): summary(a, None if eps is None else eps[s]) for m, (xs, eps) in accs.items() for s, a in enumerate(xs)}
    text = privacy_tables(results, "fedit")
    head = "| method | ε = 1 (mode=client) (spent 0.99) | ε = 1 (mode=local) (spent 0.998) | mode=local, noise_multiplier=1 (spent 1.95–2.17) | ε = ∞ (no DP) |"
    assert head in text, text
    assert "| fedit | 60.00 ± 2.48 (3) | 71.00 ± 2.48 (3) | 75.00 ± 2.48 (3) | 81.00 ± 2.48 (3) |" in text


def test_paired_p_value_is_scipys_paired_t_test_and_holm_is_step_down():
    """References: scipy.stats.ttest_rel for the p-value; Holm by hand for p = (0.01, 0.04, 0.03, 0.005):
    sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 → max so far 0.06."""
    from scipy.stats import ttest_rel

    from fedlora.report.stats import holm, paired_interval, paired_p_value

    a, b = dict(enumerate(HEXA)), dict(enumerate(FEDEX))
    assert paired_p_value(a, b) == pytest.approx(ttest_rel(HEXA, FEDEX).pvalue, rel=1e-12)
    assert paired_p_value(dict(enumerate(HEXA)), dict(enumerate(FEDIT))) == pytest.approx(ttest_rel(HEXA, FEDIT).pvalue, rel=1e-12)
    assert paired_p_value({0: 1.0}, {0: 0.0}) is None  # one pair: no test
    # no spread (the same difference at every seed, up to round-off): no t-test
    assert math.isnan(paired_p_value({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})) and math.isnan(paired_p_value({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}))
    assert math.isnan(paired_p_value({0: 85.25, 1: 90.25}, {0: 85.0, 1: 90.0}))
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # a NaN (a diverged run's pair) is in nobody's family: m = 3, 0.001·3, 0.002·2, 0.003·1 → running max
    adjusted = holm([math.nan, 0.001, 0.002, 0.003])
    assert math.isnan(adjusted[0]) and adjusted[1:] == pytest.approx([0.003, 0.004, 0.004])
    # a diverged seed: the interval on the finite differences (seeds 1, 2, 3) with the divergence counted, no test
    x, y = {0: math.nan, 1: 80.0, 2: 82.0, 3: 85.0}, {0: 70.0, 1: 78.0, 2: 79.0, 3: 81.0}
    iv = paired_interval(x, y)
    assert (iv.n, iv.diverged, iv.mean) == (3, 1, pytest.approx(3.0)) and not iv.excludes_zero()
    assert math.isnan(paired_p_value(x, y))
    assert ttest_rel([80.0, 82.0, 85.0], [78.0, 79.0, 81.0]).pvalue < 0.05  # what the finite seeds alone would call


def test_which_differences_are_real_lists_confident_pairs_better_first(tmp_path):
    """hexa − fedit (1.20 ± 0.34, p from the paired t-test, ×3 pairs by Holm) is listed and real; hexa − fedex and
    fedex − fedit hold zero and are not listed. Reversed, fedit − hexa never appears: the better method comes first."""
    from scipy.stats import ttest_rel

    from fedlora.report.compare import pairwise_verdicts

    results = _grid(tmp_path)
    text = pairwise_verdicts(results, "best")
    half = 2.776445 * math.sqrt(0.075) / math.sqrt(5)
    p = ttest_rel(HEXA, FEDIT).pvalue
    assert f"| iid | hexa − fedit | 1.20 ± {half:.2f} (5) | {p:.2g} | {min(1, 3 * p):.2g} | yes |" in text
    assert "fedex −" not in text and "− fedex" not in text and "fedit − hexa" not in text and "spread: 3 in iid;" in text
    report = write_report(results, tmp_path / "report", "t", baseline="fedit").read_text()
    assert "## Which differences are real" in report
    lonely = {Cell("hexa", "iid", 0): results[Cell("hexa", "iid", 0)], Cell("fedit", "iid", 0): results[Cell("fedit", "iid", 0)]}
    assert "no comparison" in pairwise_verdicts(lonely, "best")


def test_pairs_on_fewer_seeds_than_the_means_say_so(tmp_path):
    """hexa has seeds 0–2, fedit 0–4: the means table shows 3 and 5 seeds, the paired cell 3 pairs, and
    says they are pairs of 3 and 5 seeds, so the eye does not read the gap between the two means."""
    for seed in range(5):
        write_summary(tmp_path, f"compare-sst2-fedit-iid-s{seed}", FEDIT[seed] / 100)
    for seed in range(3):
        write_summary(tmp_path, f"compare-sst2-hexa-iid-s{seed}", HEXA[seed] / 100)
    cells = [Cell("fedit", "iid", s) for s in range(5)] + [Cell("hexa", "iid", s) for s in range(3)]
    results = collect(cells, None, [f"output_dir={tmp_path}", "data.task=sst2"], run=False)
    d = [h - f for h, f in zip(HEXA[:3], FEDIT[:3])]
    assert f"| hexa | {sum(d) / 3:.2f} ± " in paired_table(results, "fedit", "best")
    assert "(3; pairs of 3 and 5 seeds)" in paired_table(results, "fedit", "best")


def test_the_plot_axis_holds_every_interval(tmp_path):
    """The y-axis holds every 95% interval (a correlation's may reach below zero), not only the runs' values."""
    from fedlora.report.compare import plot_grid

    pearson = [0.30, -0.20, 0.45]  # a wide interval: 18.33 ± 80.7 (×100), below zero
    for seed, v in enumerate(pearson):
        write_summary(tmp_path, f"compare-stsb-fedit-iid-s{seed}", v, task="stsb", metric="pearson")
    write_summary(tmp_path, "compare-stsb-hexa-iid-s0", 0.5, task="stsb", metric="pearson")
    cells = [Cell("fedit", "iid", s) for s in range(3)] + [Cell("hexa", "iid", 0)]
    results = collect(cells, None, [f"output_dir={tmp_path}", "data.task=stsb"], run=False)
    from scipy.stats import t

    xs = [100 * v for v in pearson]
    mean, sd = sum(xs) / 3, math.sqrt(sum((x - sum(xs) / 3) ** 2 for x in xs) / 2)
    lo, hi = mean - t.ppf(0.975, 2) * sd / math.sqrt(3), mean + t.ppf(0.975, 2) * sd / math.sqrt(3)
    low, high = plot_grid(results, "best", tmp_path / "p.png")
    assert low <= lo < 0 and high >= min(100.0, hi)


def test_lower_is_better_comes_from_the_summary(tmp_path):
    """A task that minimises a metric not named loss/perplexity (summary.json's lower_is_better) is judged lower-first."""
    for seed in range(5):
        for method, xs in (("fedit", FEDIT), ("hexa", HEXA)):
            write_summary(tmp_path, f"compare-sst2-{method}-iid-s{seed}", xs[seed] / 100, metric="error")
    cells = [Cell(m, "iid", s) for m in ("fedit", "hexa") for s in range(5)]
    results = collect(cells, None, [f"output_dir={tmp_path}", "data.task=sst2"], run=False)
    for r in results.values():
        r["lower_is_better"] = True
    assert "**behind**" in paired_table(results, "fedit", "best").split("| hexa |")[1].split("\n")[0]  # hexa's error is higher


def test_shards_split_a_grid_over_machines_each_run_once(tmp_path, monkeypatch, capsys):
    """`--shard K/N`: N machines, each with its own disk, run their shares; together they run
    every run folder exactly once (the centralized run, serving both partitions, too), a share
    writes no table, and the run folders copied into one place give the whole grid's table."""
    import shutil

    from fedlora import cli
    from fedlora.engine.grid import shard_of

    ran: dict[str, list[str]] = {}  # machine → the runs it trained

    def fake_run(cfg, overwrite=False):  # a finished run: its folder, config and summary, no training
        d = Path(cfg.output_dir) / cfg.name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        acc = 0.6 + 0.05 * cfg.seed
        summary = {"task": "sst2", "primary_metric": "accuracy", "best": {"accuracy": acc}, "final": {"accuracy": acc}, "train_s": 1.0}
        (d / "summary.json").write_text(json.dumps(summary))
        ran.setdefault(Path(cfg.output_dir).name, []).append(cfg.name)
        return summary

    monkeypatch.setattr("fedlora.engine.grid.run_experiment", fake_run)
    grid = ["--methods", "hexa,fedit,centralized", "--partitions", "iid,dirichlet:0.1", "--seeds", "0,1,2,3", "--out", str(tmp_path / "tables")]

    def argv(machine: str) -> list[str]:
        return ["compare", f"output_dir={tmp_path / machine}", "data.task=sst2", *grid]

    for k in (1, 2, 3):
        assert cli.main([*argv(f"m{k}"), "--shard", f"{k}/3"]) == 0
        assert "copy each machine's run folders" in capsys.readouterr().out
    assert not (tmp_path / "tables").exists()  # a share makes no table
    everything = {f"compare-sst2-{m}-{p}-s{s}" for m in ("hexa", "fedit") for p in ("iid", "dirichlet_0.1") for s in range(4)}
    everything |= {f"compare-sst2-centralized-s{s}" for s in range(4)}
    names = [n for runs in ran.values() for n in runs]
    assert sorted(names) == sorted(everything)  # each run once, on one machine
    assert len(ran) == 3 and min(map(len, ran.values())) >= 4  # 20 runs: no machine idles
    # a cell's seeds go round the machines: 3 seeds over 3 shards touch every shard
    for stem in ("compare-sst2-hexa-iid", "compare-sst2-centralized"):
        assert {shard_of(f"{stem}-s{s}", 3) for s in range(3)} == {1, 2, 3}
    # a second pass of a share finds its runs finished and runs nothing
    before = {m: list(r) for m, r in ran.items()}
    assert cli.main([*argv("m2"), "--shard", "2/3"]) == 0 and ran == before
    # --status lists one share's runs
    assert cli.main([*argv("m2"), "--shard", "2/3", "--status"]) == 0
    listed = {line.split(" | ")[0].strip("| ") for line in capsys.readouterr().out.splitlines() if "| finished |" in line}
    assert listed == set(ran["m2"])
    # the machines' run folders copied into one: the whole grid's table, nothing run again
    for k in (1, 2, 3):
        shutil.copytree(tmp_path / f"m{k}", tmp_path / "merged", dirs_exist_ok=True)
    assert cli.main([*argv("merged"), "--collect-only"]) == 0 and ran == before
    assert re.search(r"\| hexa \| 67\.50 ± [\d.]+ \(4\) \| 67\.50 ± [\d.]+ \(4\) \|", (tmp_path / "tables" / "results.md").read_text())


@pytest.mark.parametrize("shard", ["0/3", "4/3", "1/0", "a/b", "2"])
def test_bad_shards_and_a_shard_of_tables_are_refused(tmp_path, capsys, shard):
    from fedlora import cli

    argv = ["compare", f"output_dir={tmp_path}", "--seeds", "0", "--out", str(tmp_path / "t")]
    assert cli.main([*argv, "--shard", shard]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--shard must be K/N" in err and repr(shard) in err
    assert cli.main([*argv, "--shard", "1/2", "--collect-only"]) == 2
    assert "writes no tables" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
