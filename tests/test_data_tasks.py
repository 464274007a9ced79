"""GLUE task specs: names, aliases, label orders (as on the hub), metrics."""

import pytest

from fedlora.data import TASKS, DataError, get_task


def test_all_tasks_present():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "mnli-mm", "qnli", "rte", "wnli"}


@pytest.mark.parametrize(
    "alias, name",
    [
        ("SST-2", "sst2"),
        ("sst2", "sst2"),
        ("Sst_2", "sst2"),
        ("STS-B", "stsb"),
        ("stsb", "stsb"),
        ("CoLA", "cola"),
        ("MRPC", "mrpc"),
        ("QQP", "qqp"),
        ("QNLI", "qnli"),
        ("RTE", "rte"),
        ("WNLI", "wnli"),
        ("MNLI", "mnli"),
        ("MNLI-m", "mnli"),
        ("mnli_matched", "mnli"),
        ("MNLI-MM", "mnli-mm"),
        ("mnli_mm", "mnli-mm"),
        ("mnli-mismatched", "mnli-mm"),
    ],
)
def test_aliases(alias, name):
    assert get_task(alias).name == name
    assert get_task(get_task(alias)) is get_task(alias)


def test_unknown_task_lists_known():
    with pytest.raises(DataError, match=r"unknown GLUE task 'squad'.*cola.*sst2.*wnli"):
        get_task("squad")


@pytest.mark.parametrize(
    "name, labels",
    [
        ("cola", ("unacceptable", "acceptable")),
        ("sst2", ("negative", "positive")),
        ("mrpc", ("not_equivalent", "equivalent")),
        ("qqp", ("not_duplicate", "duplicate")),
        ("mnli", ("entailment", "neutral", "contradiction")),
        ("mnli-mm", ("entailment", "neutral", "contradiction")),
        ("qnli", ("entailment", "not_entailment")),
        ("rte", ("entailment", "not_entailment")),
        ("wnli", ("not_entailment", "entailment")),
    ],
)
def test_label_order_matches_hub(name, labels):
    t = get_task(name)
    assert t.label_names == labels and t.num_labels == len(labels) and not t.is_regression


def test_stsb_is_regression():
    t = get_task("STS-B")
    assert t.is_regression and t.num_labels == 1 and t.label_names is None
    assert t.metrics == ("pearson", "spearman") and t.primary_metric == "pearson"


@pytest.mark.parametrize(
    "name, metrics, primary",
    [
        ("cola", ("mcc",), "mcc"),
        ("mrpc", ("accuracy", "f1"), "accuracy"),
        ("qqp", ("accuracy", "f1"), "accuracy"),
        ("sst2", ("accuracy",), "accuracy"),
        ("mnli", ("accuracy",), "accuracy"),
        ("qnli", ("accuracy",), "accuracy"),
        ("rte", ("accuracy",), "accuracy"),
        ("wnli", ("accuracy",), "accuracy"),
    ],
)
def test_official_metrics(name, metrics, primary):
    t = get_task(name)
    assert t.metrics == metrics and t.primary_metric == primary


def test_mnli_matched_and_mismatched_share_train():
    m, mm = get_task("mnli"), get_task("mnli-mm")
    assert (m.local_dir, m.train_file, m.hub_config) == (mm.local_dir, mm.train_file, mm.hub_config)
    assert (m.dev_file, m.hub_dev_split) == ("dev_matched.tsv", "validation_matched")
    assert (mm.dev_file, mm.hub_dev_split) == ("dev_mismatched.tsv", "validation_mismatched")


def test_text_columns():
    assert get_task("sst2").text_columns == ("sentence",) and not get_task("sst2").is_pair
    assert get_task("qnli").text_columns == ("question", "sentence")
    assert get_task("mnli").text_columns == ("premise", "hypothesis")
    assert all(len(t.text_columns) in (1, 2) for t in TASKS.values())
