"""Exact methods: W0 + base_delta' + G' = W0 + Σ p_i·ΔW_i, checked densely, over several rounds.

ΔW_i is client i's effective delta: its start's client-only base_delta (HEXA's
folded tail) plus s_i·B_i·A_i. p_i = n_i/Σn, or 1/K with weighting="uniform".
"""

from __future__ import annotations

import pytest
import reference as ref
from helpers import MIXED_RANKS, MIXED_SHAPES, SHAPES, assert_unchanged, client_effective_delta, global_after, make, run_round, snapshot

from fedlora.core import available_methods, get_aggregator

TOL = 1e-5
NS = [30, 10, 45, 15]

EXACT = [
    ("ffa", {}),
    ("fedsvd", {}),
    ("rolora", {}),
    ("fedsb", {}),
    ("fedex", {}),
    ("flora", {}),
    ("flexlora", {}),
    ("hexa", {"drift_beta": 0.0}),
    ("hexa", {"drift_beta": 0.0, "restart": "svd_sqrt"}),
    ("hexa", {"drift_beta": 0.0, "restart": "svd_a_scale"}),
    ("hexa", {"drift_beta": 0.0, "restart": "lstsq"}),
    ("hexa", {"drift_beta": 0.0, "mixed_ranks": "truncate"}),
]
MIXED_EXACT = [(n, o) for n, o in EXACT if n in ("flora", "flexlora", "hexa")]


def test_registry_lists_every_method():
    assert available_methods() == ["fedex", "fedhl", "fedit", "fedsa", "fedsb", "fedsvd", "ffa", "flexlora", "flora", "fra", "hetlora", "hexa", "rolora"]
    for name in available_methods():
        agg = get_aggregator(name)
        assert agg.name == name
    exact = {n for n in available_methods() if get_aggregator(n).exact}
    assert exact == {"ffa", "fedsvd", "rolora", "fedsb", "fedex", "flora", "flexlora", "hexa"}


def expected_weights(ns, weighting):
    return ref.data_weights(ns) if weighting == "data_size" else ref.uniform_weights(len(ns))


def check_exact(agg, rnd, w, tol=TOL):
    for name in rnd.new.adapters:
        want = ref.weighted_sum([client_effective_delta(s, u, name) for s, u in zip(rnd.starts, rnd.updates)], w)
        got = global_after(agg, rnd.new, name)
        err = ref.rel_err(got, want)
        assert err < tol, f"{agg.name} module {name}: relative error {err:.2e}"


def check_start_scales(rnd, lora_alpha, rslora):
    for s, r in zip(rnd.starts, rnd.ranks):
        for a in s.adapters.values():
            assert a.rank == r
            assert a.scale == pytest.approx(ref.lora_scale(lora_alpha, r, rslora), rel=1e-12)


@pytest.mark.parametrize("weighting", ["data_size", "uniform"])
@pytest.mark.parametrize("alpha,rslora", [(8.0, False), (16.0, True), (5.0, False)])
@pytest.mark.parametrize("name,opts", EXACT, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in EXACT])
def test_exact_same_rank_three_rounds(name, opts, weighting, alpha, rslora):
    agg, state = make(name, SHAPES, rank=4, alpha=alpha, rslora=rslora, seed=3, weighting=weighting, **opts)
    w = expected_weights(NS, weighting)
    for t in range(3):
        snap = snapshot(state)
        rnd = run_round(agg, state, [None] * 4, NS, seed=100 * t + 7)
        assert_unchanged(state, snap)  # aggregation returns a new state
        check_start_scales(rnd, alpha, rslora)
        assert rnd.new.round == t + 1
        assert rnd.new.info["weights"] == pytest.approx(w, rel=1e-12)
        assert rnd.new.info["clients"] == ["c0", "c1", "c2", "c3"]
        check_exact(agg, rnd, w)
        state = rnd.new


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("name,opts", MIXED_EXACT, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in MIXED_EXACT])
def test_exact_mixed_ranks_three_rounds(name, opts, rslora):
    alpha = 12.0
    agg, state = make(name, MIXED_SHAPES, rank=16, alpha=alpha, rslora=rslora, seed=5, **opts)
    w = ref.data_weights(NS)
    for t in range(3):
        rnd = run_round(agg, state, MIXED_RANKS, NS, seed=31 * t + 1)
        assert rnd.ranks == MIXED_RANKS
        check_start_scales(rnd, alpha, rslora)
        check_exact(agg, rnd, w)
        state = rnd.new
        assert state.rank == 16


@pytest.mark.parametrize("name,opts", EXACT[:5], ids=[n for n, _ in EXACT[:5]])
def test_dropouts_renormalise(name, opts):
    """Only clients {0, 2} report: weights are n_i / (n_0 + n_2) and the round is exact over them."""
    agg, state = make(name, SHAPES, rank=4, seed=1, **opts)
    ns = [30, 10, 45, 15]
    full = run_round(agg, state, [None] * 4, ns, seed=9)
    sub = [0, 2]
    new = agg.aggregate(state, [full.updates[i] for i in sub])
    w = ref.data_weights([ns[i] for i in sub])
    assert new.info["weights"] == pytest.approx(w, rel=1e-12)
    assert new.info["clients"] == ["c0", "c2"]
    for name_ in SHAPES:
        want = ref.weighted_sum([client_effective_delta(full.starts[i], full.updates[i], name_) for i in sub], w)
        assert ref.rel_err(global_after(agg, new, name_), want) < TOL


def test_dropouts_mixed_ranks_hexa():
    agg, state = make("hexa", MIXED_SHAPES, rank=16, seed=2, drift_beta=0.0)
    state = run_round(agg, state, MIXED_RANKS, NS, seed=1).new  # non-zero global adapter
    rnd = run_round(agg, state, MIXED_RANKS, NS, seed=2)
    sub = [0, 2]
    new = agg.aggregate(state, [rnd.updates[i] for i in sub])
    w = ref.data_weights([NS[i] for i in sub])
    for name in MIXED_SHAPES:
        want = ref.weighted_sum([client_effective_delta(rnd.starts[i], rnd.updates[i], name) for i in sub], w)
        assert ref.rel_err(global_after(agg, new, name), want) < TOL


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_client_is_its_own_model(seed):
    """One client: the aggregate is exactly that client's model for every exact method."""
    for name, opts in EXACT:
        agg, state = make(name, SHAPES, rank=4, seed=seed, **opts)
        state = run_round(agg, state, [None] * 2, [3, 5], seed=seed).new
        rnd = run_round(agg, state, [None], [7], seed=seed + 50)
        check_exact(agg, rnd, [1.0])
