"""GLUE metrics: MCC (CoLA), accuracy + F1 (MRPC, QQP), Pearson + Spearman (STS-B),
accuracy (the rest). Values are fractions in [0, 1] (correlations in [-1, 1]), not percent.

Degenerate inputs are scored, not raised: constant predictions (or constant labels) make
Pearson/Spearman undefined, and we report 0.0 — "no correlation" — so that an untrained
or collapsed regressor gets a finite, worst-ish score a training curve can plot and a
federated average can use. MCC of constant predictions is 0.0 (scikit-learn's
convention) and F1 with no predicted positives is 0.0 (``zero_division=0``).
Non-finite predictions (a diverged model) give nan for every metric, not an error: nan
correlations, and nan accuracy/F1/MCC for logits with a nan or inf anywhere (their argmax
would be a class picked by the position of the nan, scored as if it were a prediction).

Two-class logits also get ``roc_auc``, the ROC AUC of z₁ − z₀ (the probability that a random
positive scores above a random negative): it does not depend on the decision threshold, so a
model whose threshold drifted (label skew, DP clipping) but still ranks the classes shows it
(BENCHMARKS "The fall is a shifted decision threshold"). Not a GLUE metric, never primary; left
out when the labels hold one class only (undefined).
"""

from __future__ import annotations

import numpy as np

from .errors import DataError
from .tasks import TaskSpec, get_task

__all__ = ["compute_metrics", "primary_metric"]


def primary_metric(task_spec: TaskSpec | str) -> str:
    """The metric reported for the task: "mcc" (CoLA), "pearson" (STS-B), else "accuracy"."""
    return get_task(task_spec).primary_metric


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _correlation(fn, pred: np.ndarray, gold: np.ndarray) -> float:
    if not (np.isfinite(pred).all() and np.isfinite(gold).all()):
        return float("nan")
    if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(gold) == 0:
        return 0.0  # undefined correlation: see module docstring
    return float(fn(pred, gold)[0])


def compute_metrics(task_spec: TaskSpec | str, predictions, labels) -> dict[str, float]:
    """Score ``predictions`` against ``labels`` with the task's official metrics.

    Classification: ``predictions`` are logits/probabilities (N×C, argmax taken) or class
    ids (N,). Regression: scores of shape (N,) or (N×1). Returns e.g.
    ``{"accuracy": 0.91, "f1": 0.88}``.
    """
    from scipy.stats import pearsonr, spearmanr  # imported here: scipy/sklearn are slow to import
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = get_task(task_spec)
    pred, gold = _to_numpy(predictions), _to_numpy(labels).reshape(-1)
    if len(gold) == 0:
        raise DataError(f"{spec.name}: no labels to score")
    if spec.is_regression:
        if pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        if pred.shape != gold.shape:
            raise DataError(f"{spec.name}: predictions {pred.shape} vs labels {gold.shape}; regression expects (N,) or (N, 1)")
        pred, gold = pred.astype(np.float64), gold.astype(np.float64)
        return {"pearson": _correlation(pearsonr, pred, gold), "spearman": _correlation(spearmanr, pred, gold)}

    finite = pred.dtype.kind != "f" or bool(np.isfinite(pred).all())
    margin = pred[:, 1] - pred[:, 0] if pred.ndim == 2 and pred.shape[1] == 2 == spec.num_labels else None
    if pred.ndim == 2:
        if pred.shape[1] != spec.num_labels:
            raise DataError(f"{spec.name}: logits have {pred.shape[1]} columns, task has {spec.num_labels} labels")
        pred = pred.argmax(axis=1)
    if pred.shape != gold.shape:
        raise DataError(f"{spec.name}: predictions {pred.shape} vs labels {gold.shape}")
    both = margin is not None and len(np.unique(gold)) == 2
    if not finite:  # a diverged model: nothing to score (as the correlations above)
        return {name: float("nan") for name in [*spec.metrics, *(["roc_auc"] if both else [])]}
    pred, gold = pred.astype(np.int64), gold.astype(np.int64)
    out: dict[str, float] = {}
    for name in spec.metrics:
        if name == "mcc":
            out[name] = float(matthews_corrcoef(gold, pred))
        elif name == "accuracy":
            out[name] = float(accuracy_score(gold, pred))
        elif name == "f1":  # positive class = 1 (equivalent / duplicate)
            out[name] = float(f1_score(gold, pred, pos_label=1, average="binary", zero_division=0))
        elif name == "f1_macro":  # a user's file task: every class counts the same, however rare
            out[name] = float(f1_score(gold, pred, average="macro", zero_division=0))
        else:
            raise DataError(f"{spec.name}: no scorer for metric {name!r}")
    if both:  # after the task's own metrics, which keep their columns' order
        from sklearn.metrics import roc_auc_score

        out["roc_auc"] = float(roc_auc_score(gold, margin.astype(np.float64)))
    return out
