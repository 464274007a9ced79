"""Split a training set's example indices among federated clients.

Schemes (all reproducible from ``seed``; every example lands on exactly one client):

* ``iid``          — a random permutation cut into near-equal parts (flwr `IidPartitioner`).
* ``dirichlet``    — label skew with equal client sizes: each client draws its label mix
                     from Dirichlet(α·1_C) and is filled example by example, a class that
                     runs out being dropped from every mix (flwr
                     `InnerDirichletPartitioner`'s algorithm and draws; Hsu et al. 2019).
                     Small α → clients dominated by one class. A client whose mix has no
                     weight left on any class that still has examples (small α draws exact
                     zeros) takes its remaining examples in proportion to what each class
                     has left. Feasible for any α, K ≤ N.
* ``dirichlet_class`` — label skew by class: each class is split among the clients in
                     proportions drawn from Dirichlet(α·1_K) (flwr `DirichletPartitioner`,
                     no self-balancing; FederatedScope's ``lda``). Small α → few classes per
                     client *and* unequal sizes; with few classes, small α and many
                     clients some client is often left empty, which is refused.
* ``pathological`` — each client holds exactly ``labels_per_client`` classes; each class is
                     split evenly among the clients that hold it (flwr
                     `PathologicalPartitioner`, "first-deterministic": client i holds
                     class i mod C plus random others, so all classes are used when K ≥ C).
* ``quantity``     — quantity skew: client sizes ∝ one Dirichlet(α·1_K) draw, labels IID
                     (flwr `SizePartitioner` on a shuffled set).

Regression scores (float labels, STS-B) are binned into ``num_bins`` equal-width bins
between the smallest and largest score for the label-skew schemes and the histograms.
Class ids need not be contiguous (labels {0, 2}, an empty bin). The label-skew schemes
(``dirichlet``, ``dirichlet_class``, ``pathological``) refuse labels of a single class: they
would silently be an IID or quantity split.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence

import numpy as np

from .errors import DataError

__all__ = ["SCHEMES", "partition", "regression_bins", "bin_names", "label_histogram", "format_histogram", "write_histogram_csv"]

SCHEMES = ("iid", "dirichlet", "dirichlet_class", "pathological", "quantity")
_MAX_DRAWS = 10  # quantity skew: redraws before giving up (as flwr's Dirichlet does)
_LABEL_SKEW = ("dirichlet", "dirichlet_class", "pathological")


def regression_bins(scores, num_bins: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Equal-width bins over [min, max] of ``scores``: (bin id per score, num_bins+1 edges).

    Bins are half-open [e_i, e_{i+1}) except the last, which includes the maximum.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if num_bins < 1:
        raise DataError(f"num_bins must be at least 1, got {num_bins}")
    if scores.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(num_bins + 1)
    edges = np.linspace(scores.min(), scores.max(), num_bins + 1)
    ids = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, num_bins - 1)
    return ids.astype(np.int64), edges


def bin_names(edges: Sequence[float]) -> list[str]:
    """Column names for regression bins: ["[0.00,1.00)", ..., "[4.00,5.00]"]."""
    e = list(edges)
    return [f"[{lo:.2f},{hi:.2f}{']' if i == len(e) - 2 else ')'}" for i, (lo, hi) in enumerate(zip(e[:-1], e[1:]))]


def _classes(labels: np.ndarray, num_bins: int) -> np.ndarray:
    """Integer class per example: the label itself, or its bin for regression scores."""
    if labels.dtype.kind == "f":
        return regression_bins(labels, num_bins)[0]
    if labels.dtype.kind not in "iub":
        raise DataError(f"labels must be integer class ids or float scores, got {labels.dtype}")
    return labels.astype(np.int64)


def partition(
    labels, num_clients: int, scheme: str, *, seed: int, alpha: float | None = None, labels_per_client: int | None = None, min_size: int = 1, num_bins: int = 5
) -> list[np.ndarray]:
    """Client index arrays (each sorted, int64) that together hold every index once.

    ``labels``: int class ids, or float scores (binned into ``num_bins`` for label skew).
    ``alpha``: Dirichlet concentration for "dirichlet" and "quantity".
    ``labels_per_client``: classes per client for "pathological".
    ``min_size``: every client must get at least this many examples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be one-dimensional, got shape {labels.shape}")
    n = len(labels)
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise DataError(f"num_clients must be a positive integer, got {num_clients!r}")
    if n == 0:
        raise DataError("cannot partition an empty dataset")
    if num_clients > n:
        raise DataError(f"more clients ({num_clients}) than examples ({n})")
    if min_size < 1:
        raise DataError(f"min_size must be at least 1, got {min_size}")
    if num_clients * min_size > n:
        raise DataError(f"{num_clients} clients × min_size {min_size} exceeds the {n} examples")
    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme in ("dirichlet", "dirichlet_class", "quantity"):
        if alpha is None:
            raise DataError(f"scheme {scheme!r} needs alpha (Dirichlet concentration > 0)")
        if not np.isfinite(alpha) or alpha <= 0:
            raise DataError(f"scheme {scheme!r}: alpha must be > 0, got {alpha}")
    classes = _classes(labels, num_bins)
    num_present = len(np.unique(classes))
    if scheme in _LABEL_SKEW and num_present < 2:
        raise DataError(
            f"scheme {scheme!r} skews clients by label, but all {n} examples have one label "
            f"({'one score bin' if labels.dtype.kind == 'f' else f'class {int(classes[0])}'}), so it would be an IID split; "
            "use scheme iid or quantity, or give the examples classes (instruction data: data.category_field)"
        )
    if scheme == "pathological":
        if labels_per_client is None or not 1 <= labels_per_client <= num_present:
            raise DataError(f"scheme 'pathological': labels_per_client must be in 1..{num_present} (classes present), got {labels_per_client}")

    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)  # shuffled first, so flwr's contiguous splits pick random examples
    sub_seed = int(rng.integers(2**31 - 1))
    if scheme == "quantity":
        sizes = _quantity_sizes(n, num_clients, alpha, min_size, rng)
        parts = _run_flwr("quantity", classes, perm, num_clients, sizes=sizes)
    elif scheme == "dirichlet":
        sizes = [n // num_clients + (1 if i < n % num_clients else 0) for i in range(num_clients)]
        # Not flwr's InnerDirichletPartitioner itself: it fails (0/0) whenever a small α leaves a
        # client's mix on exhausted classes only; `_inner_dirichlet` is its fill with that case
        # handled. Dense ids 0..C-1: the fill draws among the ids 0..C-1 (C = classes present),
        # so a gap (labels {0, 2}, an empty score bin) would leave a class never drawn.
        dense = np.unique(classes, return_inverse=True)[1].reshape(-1)
        parts = [perm[p] for p in _inner_dirichlet(dense[perm], sizes, alpha, sub_seed)]
    else:
        parts = _run_flwr(scheme, classes, perm, num_clients, alpha=alpha, min_size=min_size, labels_per_client=labels_per_client, seed=sub_seed)
    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    _check(parts, n, scheme, alpha, min_size, classes)
    return parts


def _quantity_sizes(n, k, alpha, min_size, rng) -> list[int]:
    """Client sizes ∝ Dirichlet(α·1_K), rounded by largest remainder, each ≥ min_size."""
    for _ in range(_MAX_DRAWS):
        share = rng.dirichlet(np.full(k, float(alpha))) * n
        sizes = np.floor(share).astype(np.int64)
        rest = n - sizes.sum()
        sizes[np.argsort(sizes - share, kind="stable")[:rest]] += 1
        if sizes.min() >= min_size:
            return [int(s) for s in sizes]
    raise DataError(
        f"scheme 'quantity' (alpha={alpha}, {k} clients, {n} examples) left a client "
        f"with fewer than min_size={min_size} examples in {_MAX_DRAWS} draws; "
        f"use a larger alpha or fewer clients"
    )


def _run_flwr(scheme, classes, perm, k, *, alpha=None, labels_per_client=None, min_size=1, seed=0, sizes=None) -> list[list[int]]:
    """Run the flwr-datasets partitioner on an in-memory Dataset; return original indices."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner, SizePartitioner

    # arrow format: flwr's column reads become array views, not per-row Python iteration
    ds = datasets.Dataset.from_dict({"label": classes[perm], "idx": perm}).with_format("arrow")
    if scheme == "iid":
        part = IidPartitioner(num_partitions=k)
    elif scheme == "dirichlet_class":
        part = DirichletPartitioner(
            num_partitions=k, partition_by="label", alpha=float(alpha), min_partition_size=min_size, self_balancing=False, shuffle=True, seed=seed
        )
    elif scheme == "pathological":
        part = PathologicalPartitioner(
            num_partitions=k,
            partition_by="label",
            num_classes_per_partition=int(labels_per_client),
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    else:
        part = SizePartitioner(partition_sizes=sizes)
    part.dataset = ds
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flwr warns on every redraw; we raise our own error
            part.num_partitions  # noqa: B018 — runs flwr's assignment
            # flwr's own result (rows of `ds`); read directly because `load_partition`'s
            # `select` hashes the index list for a fingerprint, seconds per client.
            rows = getattr(part, "_partition_id_to_indices", None)
            if rows and len(rows) == k:
                return [perm[np.asarray(rows[i], dtype=np.int64)] for i in range(k)]
            return [np.asarray(part.load_partition(i)["idx"]) for i in range(k)]
    except ValueError as e:
        if scheme == "dirichlet_class":  # flwr gives up after 10 draws that each left a client too small
            raise DataError(
                f"scheme {scheme!r} (alpha={alpha}, {k} clients, {len(perm)} examples) "
                f"left a client with fewer than min_size={min_size} examples in every "
                f"draw (flwr: {e}); use a larger alpha or fewer clients"
            ) from e
        raise DataError(f"scheme {scheme!r} with {k} clients failed: {e}") from e


def _inner_dirichlet(targets: np.ndarray, sizes: Sequence[int], alpha: float, seed: int) -> list[np.ndarray]:
    """Positions in ``targets`` (class ids 0..C-1) per client, client i getting ``sizes[i]``.

    flwr's `InnerDirichletPartitioner` fill, draw for draw (the same partitions wherever flwr
    succeeds): every client draws a class mix from Dirichlet(α·1_C); then, one example at a
    time, a random client that is not yet full draws a class from its mix; a class that has
    run out is dropped from every mix, which is renormalised. flwr divides by zero where a mix
    has no weight left on any class that still has examples (small α draws exact zeros, e.g.
    (1, 0) for two classes) and fails; such a client here draws from what is left, in
    proportion to each class's remaining examples. flwr's final shuffle within each client is
    left out: the caller sorts the indices, and nothing is drawn after it.
    """
    rng = np.random.default_rng(seed)
    k, num_classes = len(sizes), int(targets.max()) + 1
    priors = rng.dirichlet(np.full(num_classes, float(alpha)), size=k)
    pools = [np.flatnonzero(targets == c) for c in range(num_classes)]
    left_in_class = [len(p) for p in pools]
    chosen = [np.zeros(s, dtype=np.int64) for s in sizes]
    left = list(sizes)
    not_full = list(range(k))
    while sum(left):
        cid = int(rng.choice(not_full))
        if left[cid] == 0:
            not_full.remove(cid)
            continue
        left[cid] -= 1
        while True:
            mix = priors[cid]
            if not mix.any():  # no weight on any class with examples left (flwr: NaN)
                mix = np.asarray(left_in_class, dtype=np.float64) / sum(left_in_class)
            c = int(rng.choice(num_classes, p=mix))
            if left_in_class[c] == 0:
                priors[:, c] = 0
                sums = priors.sum(axis=1, keepdims=True)
                # a row with nothing left stays zero (flwr's 0/0 is NaN); the others divide as flwr's do
                priors = np.divide(priors, sums, out=np.zeros_like(priors), where=sums > 0)
                continue
            left_in_class[c] -= 1
            chosen[cid][left[cid]] = pools[c][left_in_class[c]]
            break
    return chosen


def _check(parts, n, scheme, alpha, min_size, classes) -> None:
    """Refuse empty or too-small clients and dropped examples, naming the scheme."""
    sizes = [len(p) for p in parts]
    small = [i for i, s in enumerate(sizes) if s < min_size]
    if small:
        hint = "fewer clients" if alpha is None else "a larger alpha or fewer clients"
        raise DataError(
            f"scheme {scheme!r}" + (f" (alpha={alpha})" if alpha is not None else "") + f" left client(s) {small} with fewer than min_size={min_size} "
            f"examples; use {hint}"
        )
    used = np.concatenate(parts)
    if len(used) != n or len(np.unique(used)) != n:
        dropped = sorted(set(range(n)) - set(used.tolist()))
        lost = sorted(set(classes[dropped].tolist())) if dropped else []
        raise DataError(
            f"scheme {scheme!r} assigned {len(np.unique(used))} of {n} examples "
            f"(labels {lost} were given to no client); use more clients or more "
            "labels_per_client so every label is held by some client"
        )


def label_histogram(labels, parts: Sequence[np.ndarray], num_classes: int | None = None, num_bins: int = 5) -> np.ndarray:
    """Counts per client and class (K × C, int64); regression scores are binned as above."""
    labels = np.asarray(labels)
    classes = _classes(labels, num_bins)
    if labels.dtype.kind == "f":
        num_classes = num_bins
    elif num_classes is None:
        num_classes = int(classes.max()) + 1 if len(classes) else 0
    hist = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, p in enumerate(parts):
        hist[i] = np.bincount(classes[np.asarray(p, dtype=np.int64)], minlength=num_classes)[:num_classes]
    return hist


def _names(hist: np.ndarray, label_names) -> list[str]:
    if label_names is None:
        return [str(c) for c in range(hist.shape[1])]
    if len(label_names) != hist.shape[1]:
        raise DataError(f"{len(label_names)} label names for {hist.shape[1]} histogram columns")
    return [str(x) for x in label_names]


def format_histogram(hist: np.ndarray, label_names: Sequence[str] | None = None) -> str:
    """A console table: one row per client, one column per class, totals last."""
    hist = np.asarray(hist)
    header = ["client", *_names(hist, label_names), "total"]
    rows = [[str(i), *map(str, row), str(row.sum())] for i, row in enumerate(hist)]
    rows.append(["all", *map(str, hist.sum(0)), str(hist.sum())])
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def fmt(r):
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(header), *map(fmt, rows)])


def write_histogram_csv(path: str | os.PathLike, hist: np.ndarray, label_names: Sequence[str] | None = None) -> None:
    """Write the histogram as CSV: client, <one column per class>, total."""
    hist = np.asarray(hist)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["client", *_names(hist, label_names), "total"])
        for i, row in enumerate(hist):
            w.writerow([i, *row.tolist(), int(row.sum())])
