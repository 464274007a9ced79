"""What a run shows its user besides results: no library warnings that are not the user's
to act on (peft's call of a deprecated transformers property), whole rounds on plot axes."""

from __future__ import annotations

import warnings

import matplotlib.pyplot as plt
import pytest
from engine_support import is_png

from fedlora.models.export import quiet_peft
from fedlora.report.plots import curves_figure, plot_metric


def test_quiet_peft_silences_that_warning_only():
    """The filter is targeted: other FutureWarnings still reach the user. (A whole run's
    stderr is checked in tests/test_cli_paths.py.)"""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_peft():
            warnings.warn(
                "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
                FutureWarning,
            )
            warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]


@pytest.mark.parametrize("rounds", [[1, 2], [1, 2, 3], [1, 2, 3, 4], list(range(1, 31))])
def test_round_ticks_are_integers(rounds):
    fig, ax = curves_figure({"accuracy": (rounds, [0.5 + 0.01 * r for r in rounds])}, "accuracy", "t")
    try:
        lo, hi = ax.get_xlim()
        shown = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert len(shown) >= 2, shown
        assert all(float(t).is_integer() for t in shown), shown
    finally:
        plt.close(fig)


def test_plot_metric_writes_a_png(tmp_path):
    rows = [
        {"round": 1, "eval_accuracy": 0.6},
        {"round": 2},
        {"round": 3, "eval_accuracy": 0.7},
    ]
    plot_metric(rows, "eval_accuracy", "hexa on sst2", tmp_path / "metrics.png")
    assert is_png(tmp_path / "metrics.png")


@pytest.mark.parametrize("first", ["nan", "finite"])
def test_a_diverged_round_is_never_the_best(first):
    """STS-B's Pearson is NaN for a model whose predictions diverged. max() over rounds with a NaN
    kept or skipped it depending on where it stood; the best round is the best finite one, wherever
    the NaN round is."""
    import math
    from types import SimpleNamespace as NS

    from fedlora.engine.run import summarise

    exp = NS(
        task=NS(name="stsb", primary_metric="pearson", lower_is_better=False),
        cfg=NS(fed=NS(mode="federated", method="fedit"), partition=NS(scheme="iid", alpha=0.5), seed=0),
        fm=NS(placement=NS(describe=lambda: "cpu")),
        privacy=None,
    )
    values = [math.nan, 0.5, 0.7] if first == "nan" else [0.5, math.nan, 0.7]
    rows = [
        {"round": i, "eval_pearson": v, "train_s": 1.0, "aggregate_s": 0.0, "fold_s": 0.0, "bytes_down": 0, "bytes_up": 0}
        for i, v in enumerate(values, start=1)
    ]
    summary = summarise(exp, rows)
    assert summary["best"]["pearson"] == 0.7 and summary["best_round"] == 3
