"""partition: coverage, reproducibility, skew, errors; histograms."""

import csv

import numpy as np
import pytest

from fedlora.data import DataError, bin_names, format_histogram, label_histogram, partition, regression_bins, write_histogram_csv

LABELS = np.repeat(np.arange(4), 500)  # 2000 examples, 4 balanced classes
SCORES = np.random.default_rng(0).uniform(0, 5, 600).astype(np.float32)  # STS-B-like
SCHEMES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.5}),
    ("dirichlet_class", {"alpha": 0.5}),
    ("pathological", {"labels_per_client": 2}),
    ("quantity", {"alpha": 1.0}),
]


def mean_entropy(hist):
    q = hist / hist.sum(1, keepdims=True)
    return float(-(q * np.log(np.where(q > 0, q, 1.0))).sum(1).mean())


@pytest.mark.parametrize("scheme, kw", SCHEMES)
@pytest.mark.parametrize("labels", [LABELS, SCORES], ids=["classes", "scores"])
def test_every_index_exactly_once(scheme, kw, labels):
    parts = partition(labels, 8, scheme, seed=0, **kw)
    assert len(parts) == 8 and all(len(p) >= 1 for p in parts)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, unique
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


@pytest.mark.parametrize("scheme, kw", SCHEMES)
def test_reproducible_by_seed(scheme, kw):
    a = partition(LABELS, 8, scheme, seed=7, **kw)
    b = partition(LABELS, 8, scheme, seed=7, **kw)
    c = partition(LABELS, 8, scheme, seed=8, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_is_balanced():
    parts = partition(LABELS, 8, "iid", seed=0)
    assert {len(p) for p in parts} == {250}
    assert mean_entropy(label_histogram(LABELS, parts)) > 0.95 * np.log(4)


@pytest.mark.parametrize("scheme,bound", [("dirichlet", 0.65), ("dirichlet_class", 0.5)])
def test_dirichlet_small_alpha_is_more_skewed_than_iid(scheme, bound):
    # Equal-size clients ("dirichlet") must take other classes once theirs run out,
    # so they are less skewed than per-class splits at the same α.
    iid = mean_entropy(label_histogram(LABELS, partition(LABELS, 8, "iid", seed=0)))
    for seed in range(3):
        skewed = mean_entropy(label_histogram(LABELS, partition(LABELS, 8, scheme, alpha=0.1, seed=seed)))
        flat = mean_entropy(label_histogram(LABELS, partition(LABELS, 8, scheme, alpha=100.0, seed=seed)))
        assert skewed < bound * iid and flat > 0.95 * iid


def test_pathological_labels_per_client():
    for k in (1, 2, 3):
        parts = partition(LABELS, 8, "pathological", labels_per_client=k, seed=1)
        assert all(len(np.unique(LABELS[p])) <= k for p in parts)
        assert all(len(np.unique(LABELS[p])) == k for p in parts)


def test_quantity_skews_sizes_not_labels():
    parts = partition(LABELS, 8, "quantity", alpha=0.5, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 3 * sizes.min()
    big = [p for p in parts if len(p) >= 100]
    for p in big:  # labels stay IID within each client
        shares = np.bincount(LABELS[p], minlength=4) / len(p)
        assert np.all(np.abs(shares - 0.25) < 0.12)
    even = [len(p) for p in partition(LABELS, 8, "quantity", alpha=1000.0, seed=0)]
    assert max(even) - min(even) < 60


def test_regression_scores_binned_for_label_skew():
    ids, edges = regression_bins(np.array([0.0, 0.99, 1.0, 2.5, 4.99, 5.0]), 5)
    assert ids.tolist() == [0, 0, 1, 2, 4, 4] and np.allclose(edges, [0, 1, 2, 3, 4, 5])
    assert bin_names(edges)[0] == "[0.00,1.00)" and bin_names(edges)[-1] == "[4.00,5.00]"
    parts = partition(SCORES, 5, "pathological", labels_per_client=1, seed=0)
    bins = regression_bins(SCORES, 5)[0]
    assert all(len(np.unique(bins[p])) == 1 for p in parts)
    hist = label_histogram(SCORES, parts)
    assert hist.shape == (5, 5) and hist.sum() == 600 and np.count_nonzero(hist) == 5


def test_min_size():
    parts = partition(LABELS, 8, "dirichlet", alpha=0.5, seed=0, min_size=50)
    assert min(len(p) for p in parts) >= 50


@pytest.mark.parametrize(
    "args, kw, message",
    [
        ((LABELS[:5], 6, "iid"), {}, r"more clients \(6\) than examples \(5\)"),
        ((LABELS, 0, "iid"), {}, "num_clients must be a positive integer"),
        ((LABELS, 2.5, "iid"), {}, "num_clients must be a positive integer"),
        ((LABELS, 4, "dirichlet"), {}, "scheme 'dirichlet' needs alpha"),
        ((LABELS, 4, "dirichlet"), {"alpha": 0.0}, "alpha must be > 0"),
        ((LABELS, 4, "quantity"), {"alpha": -1.0}, "alpha must be > 0"),
        ((LABELS, 4, "quantity"), {}, "scheme 'quantity' needs alpha"),
        ((LABELS, 4, "pathological"), {}, r"labels_per_client must be in 1\.\.4"),
        ((LABELS, 4, "pathological"), {"labels_per_client": 0}, r"labels_per_client must be in 1\.\.4"),
        ((LABELS, 4, "pathological"), {"labels_per_client": 5}, r"labels_per_client must be in 1\.\.4"),
        ((LABELS, 4, "label_skew"), {}, "unknown partition scheme 'label_skew'; choose one of iid, dirichlet, dirichlet_class"),
        ((LABELS[:0], 1, "iid"), {}, "empty dataset"),
        ((LABELS, 4, "iid"), {"min_size": 0}, "min_size must be at least 1"),
        ((np.array(["a", "b"]), 2, "iid"), {}, "labels must be integer class ids or float scores"),
    ],
)
def test_bad_inputs(args, kw, message):
    with pytest.raises(DataError, match=message):
        partition(*args, seed=0, **kw)


def test_empty_client_errors_name_scheme_and_suggest_fix():
    labels = np.arange(20) % 2
    with pytest.raises(DataError, match=r"scheme 'dirichlet_class'.*larger alpha or fewer clients"):
        partition(labels, 10, "dirichlet_class", alpha=0.01, seed=0)
    with pytest.raises(DataError, match=r"scheme 'quantity' \(alpha=0.01.*larger alpha or fewer clients"):
        partition(labels, 10, "quantity", alpha=0.01, seed=0)
    with pytest.raises(DataError, match=r"scheme 'pathological'.*labels \[2, 3\] were given to no client"):
        partition(np.arange(20) % 4, 2, "pathological", labels_per_client=1, seed=0)


def test_histogram_format_and_csv(tmp_path):
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 2]), np.array([1, 3, 4, 5])]
    hist = label_histogram(labels, parts, num_classes=4)
    assert hist.tolist() == [[1, 1, 0, 0], [1, 0, 3, 0]]
    text = format_histogram(hist, ["ent", "neu", "con", "x"])
    lines = text.splitlines()
    assert lines[0].split() == ["client", "ent", "neu", "con", "x", "total"]
    assert lines[2].split() == ["1", "1", "0", "3", "0", "4"]
    assert lines[-1].split() == ["all", "2", "1", "3", "0", "6"]
    assert format_histogram(hist).splitlines()[0].split() == ["client", "0", "1", "2", "3", "total"]
    write_histogram_csv(tmp_path / "h.csv", hist, ["ent", "neu", "con", "x"])
    rows = list(csv.reader(open(tmp_path / "h.csv")))
    assert rows == [["client", "ent", "neu", "con", "x", "total"], ["0", "1", "1", "0", "0", "2"], ["1", "1", "0", "3", "0", "4"]]
    with pytest.raises(DataError, match="2 label names for 4 histogram columns"):
        format_histogram(hist, ["a", "b"])


def test_dirichlet_small_alpha_many_clients_few_classes_is_feasible_and_equal_sized():
    """The grid's hardest case: 2 classes, 10 clients, α = 0.1 (per-class splitting fails here)."""
    labels = np.random.default_rng(1).integers(0, 2, size=1000)
    parts = partition(labels, 10, "dirichlet", alpha=0.1, seed=0)
    sizes = sorted(len(p) for p in parts)
    assert sizes == [100] * 10
    hist = label_histogram(labels, parts)
    majority = hist.max(1) / hist.sum(1)
    assert np.median(majority) > 0.8  # most clients are dominated by one class
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))


def _flwr_inner_dirichlet(targets, sizes, alpha, seed):
    """flwr's own InnerDirichletPartitioner on ``targets``: per client, the sorted positions."""
    import datasets
    from flwr_datasets.partitioner import InnerDirichletPartitioner

    part = InnerDirichletPartitioner(partition_sizes=sizes, partition_by="label", alpha=alpha, shuffle=True, seed=seed)
    part.dataset = datasets.Dataset.from_dict({"label": targets, "idx": np.arange(len(targets))})
    return [np.sort(np.asarray(part.load_partition(i)["idx"])) for i in range(len(sizes))]


@pytest.mark.parametrize("classes, alpha", [(2, 0.1), (2, 1.0), (4, 0.5), (7, 0.3)])
def test_dirichlet_fill_is_flwrs_where_flwr_succeeds(classes, alpha):
    """The fill replaces flwr's (which fails on some draws) draw for draw: wherever flwr
    succeeds, both give the same clients, so existing partitions stay what they were."""
    from fedlora.data.partition import _inner_dirichlet

    targets = np.random.default_rng(classes).integers(0, classes, 600)
    sizes = [75] * 8
    for seed in range(4):
        expected = _flwr_inner_dirichlet(targets, sizes, alpha, seed)
        got = [np.sort(p) for p in _inner_dirichlet(targets, sizes, alpha, seed)]
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_dirichlet_class_ids_with_gaps_partition_like_dense_ids():
    """Labels {0, 2} (and scores with empty bins) are the same two classes as {0, 1}: the same
    split, every example used; flwr's partitioner never draws id 2 and fails."""
    dense = np.random.default_rng(0).integers(0, 2, 1000)
    gapped = dense * 2
    expected = partition(dense, 4, "dirichlet", alpha=0.5, seed=0)
    got = partition(gapped, 4, "dirichlet", alpha=0.5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert sorted(np.concatenate(got).tolist()) == list(range(1000)) and {len(p) for p in got} == {250}
    # Scores at both ends of [0, 5]: bins 0 and 4 hold them, bins 1..3 are empty.
    scores = np.where(dense == 1, 4.5, 0.5).astype(np.float32)
    scores[:2] = [0.0, 5.0]  # the range is [0, 5]: five bins of width 1
    assert np.unique(regression_bins(scores)[0]).tolist() == [0, 4]
    by_score = partition(scores, 4, "dirichlet", alpha=0.5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(by_score, partition((scores > 2.5).astype(int), 4, "dirichlet", alpha=0.5, seed=0)))


def test_dirichlet_tiny_alpha_where_a_mix_runs_out_is_still_filled():
    """α = 0.001 draws mixes with exact zeros: a client whose only class runs out has no weight
    left anywhere (flwr divides by zero and fails); it takes what is left instead."""
    labels = np.random.default_rng(1).integers(0, 2, 1000)
    for seed in range(3):
        parts = partition(labels, 100, "dirichlet", alpha=0.001, seed=seed)
        assert {len(p) for p in parts} == {10}
        assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
        hist = label_histogram(labels, parts, num_classes=2)
        assert (hist.max(1) == 10).mean() > 0.6  # most clients hold one class only (those filled as a class ran out mix)
    # the case the fill handles: flwr itself divides 0 by 0 on it and fails
    with pytest.raises(ValueError, match="NaN"), pytest.warns(RuntimeWarning, match="invalid value encountered in divide"):
        _flwr_inner_dirichlet(labels, [10] * 100, 0.001, 0)


@pytest.mark.parametrize("scheme, kw", [("dirichlet", {"alpha": 0.5}), ("dirichlet_class", {"alpha": 0.5}), ("pathological", {"labels_per_client": 1})])
def test_label_skew_of_one_class_is_refused(scheme, kw):
    """One class (instruction data without data.category_field): a label skew would be an IID split."""
    one = np.zeros(100, dtype=np.int64)
    with pytest.raises(DataError, match=rf"scheme '{scheme}' skews clients by label, but all 100 examples have one label.*data\.category_field"):
        partition(one, 4, scheme, seed=0, **kw)
    with pytest.raises(DataError, match="one score bin"):
        partition(np.full(100, 2.5, dtype=np.float32), 4, scheme, seed=0, **kw)
    assert len(partition(one, 4, "iid", seed=0)) == len(partition(one, 4, "quantity", alpha=1.0, seed=0)) == 4
