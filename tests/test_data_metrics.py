"""compute_metrics against values computed by hand from their formulas."""

import math
import warnings

import numpy as np
import pytest
import torch

from fedlora.data import DataError, compute_metrics, get_task, primary_metric

# A 2×2 confusion matrix: TP=3, TN=2, FP=1, FN=2 (positive class = 1).
GOLD = np.array([1, 1, 1, 0, 0, 1, 1, 0])
PRED = np.array([1, 1, 1, 0, 0, 0, 0, 1])
TP, TN, FP, FN = 3, 2, 1, 2


def logits(pred, num_classes=2):
    out = np.full((len(pred), num_classes), -1.0)
    out[np.arange(len(pred)), pred] = 2.0
    return out


def test_cola_mcc_by_formula():
    mcc = (TP * TN - FP * FN) / math.sqrt((TP + FP) * (TP + FN) * (TN + FP) * (TN + FN))
    assert mcc == pytest.approx(4 / math.sqrt(240))
    m = compute_metrics("cola", logits(PRED), GOLD)
    assert m.keys() == {"mcc", "roc_auc"} and m["mcc"] == pytest.approx(mcc)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_and_f1_by_formula(task):
    m = compute_metrics(task, logits(PRED), GOLD)
    assert m["accuracy"] == pytest.approx((TP + TN) / 8)
    assert m["f1"] == pytest.approx(2 * TP / (2 * TP + FP + FN))


def test_accuracy_three_classes_and_class_ids():
    gold = np.array([0, 1, 2, 2, 1, 0])
    pred = np.array([0, 2, 2, 2, 1, 1])
    assert compute_metrics("mnli", logits(pred, 3), gold) == {"accuracy": pytest.approx(4 / 6)}
    assert compute_metrics("rte", PRED, GOLD) == {"accuracy": pytest.approx(5 / 8)}  # ids, not logits
    t = compute_metrics("sst2", torch.tensor(logits(PRED)), torch.tensor(GOLD))
    assert t == {"accuracy": pytest.approx(5 / 8), "roc_auc": pytest.approx(AUC)}


# ROC AUC of z1 − z0 by counting: 5 positives × 3 negatives = 15 pairs; a pair scores 1 when the
# positive's margin is above the negative's, ½ on a tie. logits(PRED) gives margin +3 where PRED = 1,
# −3 where 0: positives at +3 (the 3 TP) beat the 2 TN (6 pairs) and tie the FP (3 × ½); positives at
# −3 (the 2 FN) tie the 2 TN (4 × ½) and lose to the FP.
AUC = (6 + 1.5 + 2) / 15


def test_roc_auc_of_two_class_logits_by_counting_pairs():
    assert compute_metrics("sst2", logits(PRED), GOLD)["roc_auc"] == pytest.approx(AUC)
    # it does not move with the threshold: every margin shifted by +10 predicts all positive, same ranking
    shifted = logits(PRED) + np.array([0.0, 10.0])
    m = compute_metrics("sst2", shifted, GOLD)
    assert (shifted.argmax(1) == 1).all() and m["accuracy"] == pytest.approx(5 / 8)  # all called positive: the 5 positives of 8
    assert m["roc_auc"] == pytest.approx(AUC)
    # class ids (no margin), more than two classes, one class in the labels: no AUC
    assert "roc_auc" not in compute_metrics("sst2", PRED, GOLD)
    assert "roc_auc" not in compute_metrics("mnli", logits(np.array([0, 1, 2]), 3), np.array([0, 1, 2]))
    assert "roc_auc" not in compute_metrics("sst2", logits(PRED), np.ones(8, dtype=int))
    # a diverged model: NaN like every other metric
    bad = logits(PRED)
    bad[0, 0] = np.nan
    assert math.isnan(compute_metrics("sst2", bad, GOLD)["roc_auc"])


def test_stsb_pearson_and_spearman_by_formula():
    pred = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    gold = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    dp, dg = pred - pred.mean(), gold - gold.mean()
    pearson = (dp @ dg) / math.sqrt((dp @ dp) * (dg @ dg))
    d = np.array([1, 2, 3, 4, 5]) - np.array([2, 1, 4, 3, 5])  # rank differences
    spearman = 1 - 6 * (d @ d) / (5 * (5**2 - 1))
    m = compute_metrics("stsb", pred, gold)
    assert m["pearson"] == pytest.approx(pearson) and m["spearman"] == pytest.approx(spearman)
    assert compute_metrics("STS-B", pred[:, None], gold) == m  # (N, 1)
    assert compute_metrics("stsb", torch.tensor(pred[:, None]), torch.tensor(gold)) == pytest.approx(m)


def test_constant_predictions_give_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compute_metrics("stsb", np.full(4, 2.5), [0.0, 1.0, 2.0, 5.0]) == {"pearson": 0.0, "spearman": 0.0}
        assert compute_metrics("stsb", [1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == {"pearson": 0.0, "spearman": 0.0}
        assert compute_metrics("cola", np.zeros(8, dtype=int), GOLD) == {"mcc": 0.0}
        assert compute_metrics("mrpc", np.zeros(8, dtype=int), GOLD)["f1"] == 0.0


def test_nan_predictions_give_nan():
    m = compute_metrics("stsb", [1.0, float("nan"), 3.0], [1.0, 2.0, 3.0])
    assert math.isnan(m["pearson"]) and math.isnan(m["spearman"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("task", ["sst2", "cola", "mrpc", "mnli"])
def test_non_finite_logits_give_nan_for_every_metric(task, bad):
    """A diverged classifier scores nan, not the accuracy of argmax over nan (always class 0 here,
    which an all-negative dev set would score as perfect)."""
    spec = get_task(task)
    gold = np.zeros(4, dtype=np.int64)
    scores = np.zeros((4, spec.num_labels), dtype=np.float32)
    scores[1, 0] = bad
    m = compute_metrics(task, scores, gold)
    assert set(m) == set(spec.metrics) and all(math.isnan(v) for v in m.values())
    assert all(math.isnan(v) for v in compute_metrics(task, torch.tensor(scores), gold).values())
    with pytest.raises(DataError, match="logits have 9 columns"):  # still checked first
        compute_metrics(task, np.full((4, 9), np.nan), gold)


def test_shape_errors():
    with pytest.raises(DataError, match="logits have 3 columns, task has 2 labels"):
        compute_metrics("rte", np.zeros((8, 3)), GOLD)
    with pytest.raises(DataError, match="predictions"):
        compute_metrics("rte", PRED[:5], GOLD)
    with pytest.raises(DataError, match=r"regression expects \(N,\) or \(N, 1\)"):
        compute_metrics("stsb", np.zeros((8, 2)), np.zeros(8))
    with pytest.raises(DataError, match="no labels"):
        compute_metrics("rte", [], [])


def test_primary_metric():
    assert [primary_metric(t) for t in ("cola", "stsb", "mrpc", "sst2")] == ["mcc", "pearson", "accuracy", "accuracy"]
    assert primary_metric(get_task("MNLI-mm")) == "accuracy"


def test_a_file_tasks_macro_f1_is_sklearns():
    """A user's 3-class file task reports accuracy and macro F1 (it reported accuracy alone: the
    scorer skipped the name it did not know). Reference: F1 per class by hand, then their mean."""
    from fedlora.config import load_config
    from fedlora.engine.experiment import file_task

    spec = file_task(load_config(None, ["data.task=file", "data.text_columns=[text]"]), ["a", "b", "c"])
    gold = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    pred = np.array([0, 1, 1, 1, 2, 0, 2, 0])
    f1 = []
    for c in range(3):
        tp, fp, fn = ((pred == c) & (gold == c)).sum(), ((pred == c) & (gold != c)).sum(), ((pred != c) & (gold == c)).sum()
        f1.append(2 * tp / (2 * tp + fp + fn))
    got = compute_metrics(spec, pred, gold)
    assert got["accuracy"] == pytest.approx(6 / 8) and got["f1_macro"] == pytest.approx(sum(f1) / 3)


def test_a_metric_without_a_scorer_is_an_error_not_a_missing_key():
    from fedlora.data.tasks import TaskSpec

    spec = TaskSpec("mine", "", ("text",), ("a", "b"), ("accuracy", "auroc"), "accuracy", "")
    with pytest.raises(DataError, match="no scorer for metric 'auroc'"):
        compute_metrics(spec, np.array([0, 1]), np.array([0, 1]))
