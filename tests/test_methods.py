"""Method-specific rules against hand-computed dense float64 results (all but HEXA)."""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from helpers import (
    MIXED_RANKS,
    MIXED_SHAPES,
    SHAPES,
    assert_unchanged,
    client_effective_delta,
    client_round,
    fdense,
    global_after,
    make,
    run_round,
    snapshot,
)

from fedlora.core import Adapter, AggregationError, ClientUpdate, UpdateError, available_methods, get_aggregator
from fedlora.core.methods.hetlora import pruned_rank, tail_norm
from fedlora.core.state import LoraSpec

NS = [30, 10, 45, 15]


def P(a: Adapter):
    return ref.product(a.B, a.A, a.scale)


# ------------------------------------------------------------------ weights
@pytest.mark.parametrize("name", ["fedit", "fedex", "ffa", "fra", "flora", "flexlora", "hetlora", "hexa", "fedhl"])
def test_base_weights_data_size_and_uniform(name):
    for weighting, want in [("data_size", ref.data_weights(NS)), ("uniform", [0.25] * 4)]:
        agg, state = make(name, SHAPES, rank=4, weighting=weighting)
        new = run_round(agg, state, [None] * 4, NS, seed=4).new
        assert new.info["weights"] == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", ["fedit", "fedex", "ffa", "fra", "flora", "flexlora", "hetlora", "hexa", "fedhl"])
def test_subset_of_clients_renormalises(name):
    """Clients 1 and 3 drop out: the base weights are renormalised over {0, 2}."""
    agg, state = make(name, SHAPES, rank=4)
    state = run_round(agg, state, [None] * 4, NS, seed=1).new
    starts, updates = client_round(agg, state, [None] * 4, NS, seed=2)
    new = agg.aggregate(state, [updates[0], updates[2]])
    w = ref.data_weights([NS[0], NS[2]])
    assert new.info["weights"] == pytest.approx(w, rel=1e-12)
    assert new.info["clients"] == ["c0", "c2"]
    if name == "fedit":
        for n in SHAPES:
            B = ref.weighted_sum([updates[i].adapters[n].B for i in (0, 2)], w)
            assert ref.rel_err(new.adapters[n].B, B) < 1e-6


def test_default_weighting_is_data_size():
    for name in available_methods():
        assert get_aggregator(name).weighting == "data_size"


@pytest.mark.parametrize("name", ["fedex", "hetlora", "fedhl"])
def test_a_client_with_zero_examples_is_refused_by_name(name):
    """A zero count had weight 0 under data-size weights but a full share in HetLoRA and FedHL."""
    agg, state = make(name, SHAPES, rank=4)
    with pytest.raises(UpdateError, match="'c0'.*num_examples"):
        run_round(agg, state, [None] * 3, [0, 5, 15], seed=1)


def test_dense_params_weighted_average():
    dense = {"head.w": torch.randn(3, 5), "head.b": torch.randn(3)}
    agg, state = make("fedex", SHAPES, rank=4, dense=dense)
    starts, updates = client_round(agg, state, [None] * 3, [1, 2, 5], seed=3)
    g = torch.Generator().manual_seed(0)
    updates = [
        ClientUpdate(u.client_id, u.num_examples, u.adapters, dense={k: v + torch.randn(v.shape, generator=g) for k, v in s.dense.items()})
        for s, u in zip(starts, updates)
    ]
    new = agg.aggregate(state, updates)
    w = ref.data_weights([1, 2, 5])
    for k in dense:
        want = ref.weighted_sum([u.dense[k] for u in updates], w)
        assert new.dense[k].dtype == dense[k].dtype
        assert ref.rel_err(new.dense[k], want) < 1e-6


# -------------------------------------------------------------------- FedIT
@pytest.mark.parametrize("weighting", ["data_size", "uniform"])
@pytest.mark.parametrize("rslora", [False, True])
def test_fedit_factor_average_and_inexactness(weighting, rslora):
    agg, state = make("fedit", SHAPES, rank=4, alpha=16.0, rslora=rslora, weighting=weighting)
    for t in range(2):
        rnd = run_round(agg, state, [None] * 4, NS, seed=t)
        w = ref.data_weights(NS) if weighting == "data_size" else ref.uniform_weights(4)
        num = den = 0.0
        for name in SHAPES:
            loc = [u.adapters[name] for u in rnd.updates]
            B = ref.weighted_sum([a.B for a in loc], w)
            A = ref.weighted_sum([a.A for a in loc], w)
            g = rnd.new.adapters[name]
            assert ref.rel_err(g.B, B) < 1e-6 and ref.rel_err(g.A, A) < 1e-6
            s = ref.lora_scale(16.0, 4, rslora)
            assert g.scale == pytest.approx(s)
            ideal = ref.weighted_sum([P(a) for a in loc], w)
            num += ref.frob(ideal - s * B @ A) ** 2
            den += ref.frob(ideal) ** 2
        assert rnd.new.base_delta == {}
        assert rnd.new.info["inexactness"] == pytest.approx(math.sqrt(num / den), rel=1e-4)
        assert rnd.new.info["inexactness"] > 1e-3  # genuinely inexact for random clients
        state = rnd.new


def test_fedit_measure_error_off():
    agg, state = make("fedit", SHAPES, rank=4, measure_error=False)
    assert "inexactness" not in run_round(agg, state, [None] * 2, [1, 1], seed=0).new.info


def test_inexact_methods_fail_the_exactness_check():
    """The exactness check used in test_exactness.py is discriminating: FedIT and HetLoRA fail it."""
    for name in ("fedit", "hetlora"):
        agg, state = make(name, SHAPES, rank=4)
        state = run_round(agg, state, [None] * 3, [1, 2, 3], seed=0).new
        rnd = run_round(agg, state, [None] * 3, [1, 2, 3], seed=1)
        w = ref.data_weights([1, 2, 3])
        errs = [
            ref.rel_err(global_after(agg, rnd.new, n), ref.weighted_sum([client_effective_delta(s, u, n) for s, u in zip(rnd.starts, rnd.updates)], w))
            for n in SHAPES
        ]
        assert max(errs) > 1e-2


# ---------------------------------------------------------------------- FFA
def test_ffa_freezes_A_and_averages_B():
    agg, state = make("ffa", SHAPES, rank=4)
    A0 = {n: a.A.clone() for n, a in state.adapters.items()}
    for t in range(2):
        rnd = run_round(agg, state, [None] * 4, NS, seed=t)
        assert all(not s.train_A for s in rnd.starts)
        for name in SHAPES:
            g = rnd.new.adapters[name]
            assert torch.equal(g.A, A0[name])
            B = ref.weighted_sum([u.adapters[name].B for u in rnd.updates], ref.data_weights(NS))
            assert ref.rel_err(g.B, B) < 1e-6
        assert rnd.new.base_delta == {}
        state = rnd.new


# --------------------------------------------------------------------- FLoRA
@pytest.mark.parametrize("ranks", [[4, 4, 4, 4], MIXED_RANKS, [16, 24, 2, 8]])
def test_flora_stack_into_base_and_fresh_adapter(ranks):
    agg, state = make("flora", MIXED_SHAPES, rank=16, alpha=32.0)
    for t in range(2):
        rnd = run_round(agg, state, ranks, NS, seed=t)
        for s, r in zip(rnd.starts, ranks):
            for a in s.adapters.values():
                assert a.rank == r and torch.count_nonzero(a.B) == 0  # fresh LoRA, product 0
        w = ref.data_weights(NS)
        for name in MIXED_SHAPES:
            want = ref.weighted_sum([P(u.adapters[name]) for u in rnd.updates], w)
            assert ref.rel_err(fdense(rnd.new.base_delta[name]), want) < 1e-6
            g = rnd.new.adapters[name]
            assert g.rank == 16 and torch.count_nonzero(g.B) == 0 and torch.count_nonzero(g.A) > 0
            assert g.scale == pytest.approx(32.0 / 16)
        state = rnd.new


# ----------------------------------------------------------------------- FRA
@pytest.mark.parametrize("split", ["sqrt", "B"])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_fra_is_dense_svd_truncation(split, rslora, seed):
    r = 3
    agg, state = make("fra", SHAPES, rank=r, alpha=6.0, rslora=rslora, split=split)
    for t in range(2):
        rnd = run_round(agg, state, [None] * 4, NS, seed=10 * seed + t)
        w = ref.data_weights(NS)
        dropped = total = 0.0
        for name in SHAPES:
            M = ref.weighted_sum([P(u.adapters[name]) for u in rnd.updates], w)
            g = rnd.new.adapters[name]
            s = ref.lora_scale(6.0, r, rslora)
            assert g.scale == pytest.approx(s) and g.rank == r
            assert ref.rel_err(P(g), ref.top_r(M, r)) < 1e-5
            if split == "sqrt":  # Σ shared evenly: BᵀB = AAᵀ = diag(Σ_r/s)
                BtB, AAt = ref.d(g.B).T @ ref.d(g.B), ref.d(g.A) @ ref.d(g.A).T
                assert torch.allclose(BtB, AAt, atol=1e-5 * float(BtB.abs().max()))
            else:  # A = V_rᵀ has orthonormal rows
                assert torch.allclose(ref.d(g.A) @ ref.d(g.A).T, torch.eye(r, dtype=torch.float64), atol=1e-5)
            dropped += ref.tail_energy(M, r)
            total += ref.frob(M) ** 2
        assert rnd.new.base_delta == {}
        assert rnd.new.info["phase"] == "fra"
        assert rnd.new.info["truncation_error"] == pytest.approx(math.sqrt(dropped / total), rel=1e-4)
        state = rnd.new


@pytest.mark.parametrize("split", ["sqrt", "B"])
def test_fra_fills_directions_of_no_weight_with_a_fresh_init(split):
    """One client whose B has rank 2 < r = 4: the aggregate s·B·A has two directions. FRA kept the two
    zero singular values, and under the sqrt split B = U·√(Σ/s), A = √(Σ/s)·Vᵀ made both factors' rows
    zero there: no gradient reaches them again. Now those rows are a fresh peft init (A random, B = 0),
    as in every other SVD method, and the product is still the aggregate."""
    agg = get_aggregator("fra", split=split)
    state = agg.init_state({"q": (24, 16)}, 4, LoraSpec(alpha=8.0), seed=1)
    start = agg.client_start(state).adapters["q"]
    g = torch.Generator().manual_seed(0)
    B = torch.zeros(24, 4)
    B[:, :2] = torch.randn(24, 2, generator=g)
    A = start.A + 0.1 * torch.randn(4, 16, generator=g)
    new = agg.aggregate(state, [ClientUpdate("c0", 10, {"q": Adapter(B, A, start.scale)})]).adapters["q"]
    assert ref.rel_err(P(new), start.scale * ref.d(B) @ ref.d(A)) < 1e-5
    assert float(new.A.norm(dim=1).min()) > 0.1, new.A.norm(dim=1)  # every row of A can still learn


def test_fra_hybrid_switches_to_ffa():
    T = 2
    agg, state = make("fra", SHAPES, rank=4, fra_rounds=T)
    for t in range(T):
        rnd = run_round(agg, state, [None] * 3, NS[:3], seed=t)
        assert all(s.train_A for s in rnd.starts)
        assert rnd.new.info["phase"] == "fra"
        state = rnd.new
    A_fixed = {n: a.A.clone() for n, a in state.adapters.items()}
    for t in range(2):
        snap = snapshot(state)
        starts, updates = client_round(agg, state, [None] * 3, NS[:3], seed=50 + t)
        assert all(not s.train_A for s in starts)
        # a client that changed A is refused, naming client and module; state untouched
        bad = dict(updates[1].adapters)
        bad["v"] = Adapter(bad["v"].B, bad["v"].A + 0.01, bad["v"].scale)
        with pytest.raises(UpdateError) as e:
            agg.aggregate(state, [updates[0], ClientUpdate("c1", updates[1].num_examples, bad), updates[2]])
        assert e.value.client == "c1" and e.value.module == "v"
        assert "'c1'" in str(e.value) and "'v'" in str(e.value)
        assert_unchanged(state, snap)
        new = agg.aggregate(state, updates)
        assert new.info["phase"] == "ffa"
        w = ref.data_weights(NS[:3])
        for name in SHAPES:
            assert torch.equal(new.adapters[name].A, A_fixed[name])
            assert ref.rel_err(new.adapters[name].B, ref.weighted_sum([u.adapters[name].B for u in updates], w)) < 1e-6
            want = ref.weighted_sum([P(u.adapters[name]) for u in updates], w)
            assert ref.rel_err(global_after(agg, new, name), want) < 1e-5  # exact again
        state = new


# ------------------------------------------------------------------ FlexLoRA
@pytest.mark.parametrize("rslora,split", [(False, "B"), (True, "B"), (False, "sqrt")])
def test_flexlora_global_and_downloads(rslora, split):
    agg, state = make("flexlora", MIXED_SHAPES, rank=16, alpha=10.0, rslora=rslora, split=split)
    # round 0 downloads: product zero, every component trainable (A non-zero)
    for r in MIXED_RANKS:
        st = agg.client_start(state, r)
        for a in st.adapters.values():
            assert a.rank == r and ref.frob(P(a)) == 0.0 and torch.count_nonzero(a.A) > 0
            assert a.scale == pytest.approx(ref.lora_scale(10.0, r, rslora))
    W = None
    for t in range(3):
        rnd = run_round(agg, state, MIXED_RANKS, NS, seed=t)
        if W is not None:  # downloads are the dense rank-r_i truncations of the global delta
            for s, r in zip(rnd.starts, MIXED_RANKS):
                for name in MIXED_SHAPES:
                    assert ref.rel_err(P(s.adapters[name]), ref.top_r(W[name], r)) < 1e-5
        W = {name: ref.weighted_sum([P(u.adapters[name]) for u in rnd.updates], ref.data_weights(NS)) for name in MIXED_SHAPES}
        for name in MIXED_SHAPES:
            assert ref.rel_err(fdense(agg.global_delta(rnd.new)[name]), W[name]) < 1e-5
            g = rnd.new.adapters[name]  # the global-rank adapter is the rank-16 truncation
            assert ref.rel_err(P(g), ref.top_r(W[name], 16)) < 1e-5
        state = rnd.new


# --------------------------------------------------------------------- FedHL
# Wide enough that W_t's basis plus the clients' Σ r_i = 30 columns fit (a + b ≤ min(m, n)) for
# three rounds: SVD.plus takes its basis-update path instead of falling back to a stacked SVD.
WIDE_SHAPES = {"q": (96, 100), "fc": (128, 96)}


@pytest.mark.parametrize(
    "alpha,rslora,weighting,split,shapes",
    [
        (16.0, False, "uniform", "B", MIXED_SHAPES),
        (8.0, True, "uniform", "B", MIXED_SHAPES),
        (16.0, False, "data_size", "B", MIXED_SHAPES),
        (8.0, True, "data_size", "sqrt", MIXED_SHAPES),
        (16.0, False, "data_size", "B", WIDE_SHAPES),
        (8.0, True, "uniform", "sqrt", WIDE_SHAPES),
    ],
)
def test_fedhl_three_rounds_dense(alpha, rslora, weighting, split, shapes):
    eps = 1e-6
    times_data_size = weighting == "data_size"
    agg, state = make("fedhl", shapes, rank=16, alpha=alpha, rslora=rslora, weighting=weighting, split=split)
    W = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}
    q = ref.data_weights(NS)
    for t in range(3):
        rnd = run_round(agg, state, MIXED_RANKS, NS, seed=t, noise=0.5)
        # downloads: s_i·B·A = W_t^{r_i}
        for s, r in zip(rnd.starts, MIXED_RANKS):
            for name in shapes:
                a = s.adapters[name]
                assert a.rank == r and a.scale == pytest.approx(ref.lora_scale(alpha, r, rslora))
                if t == 0:
                    assert ref.frob(P(a)) == 0.0
                else:
                    assert ref.rel_err(P(a), ref.top_r(W[name], r)) < 1e-5
        r_hat = [sum(ref.tail_energy(W[name], r) for name in shapes) for r in MIXED_RANKS]
        raw = [1.0 / (x * x + eps) for x in r_hat]
        if times_data_size:
            raw = [a * b for a, b in zip(raw, q)]
        p = ref.normalised(raw)
        if t == 0:
            assert r_hat == [0.0] * 4
            assert p == pytest.approx(q if times_data_size else [0.25] * 4)
        else:
            assert max(r_hat) > 0 and len(set(round(x, 8) for x in p)) > 1  # weights genuinely differ
        info = rnd.new.info
        assert info["truncation_errors"] == pytest.approx(r_hat, rel=1e-4, abs=1e-9)
        assert info["fedhl_weights"] == pytest.approx(p, rel=1e-4)
        W = {name: W[name] + ref.weighted_sum([P(u.adapters[name]) - ref.top_r(W[name], r) for u, r in zip(rnd.updates, MIXED_RANKS)], p) for name in shapes}
        for name in shapes:
            assert ref.rel_err(fdense(agg.global_delta(rnd.new)[name]), W[name]) < 1e-5
            assert rnd.new.base_delta == {}
        state = rnd.new


def test_fedhl_is_not_flexlora():
    """After round 0 FedHL keeps what low-rank clients could not see (differs from FlexLoRA's Σ p_i ΔW_i)."""
    agg, state = make("fedhl", MIXED_SHAPES, rank=16)
    state = run_round(agg, state, MIXED_RANKS, NS, seed=0).new
    rnd = run_round(agg, state, MIXED_RANKS, NS, seed=1)
    p = rnd.new.info["fedhl_weights"]
    flex = ref.weighted_sum([P(u.adapters["q"]) for u in rnd.updates], p)
    assert ref.rel_err(fdense(agg.global_delta(rnd.new)["q"]), flex) > 1e-3


def test_fedhl_max_rank_caps_global():
    agg, state = make("fedhl", MIXED_SHAPES, rank=16, max_rank=6, weighting="uniform")  # round 0: the paper's uniform weights
    rnd = run_round(agg, state, MIXED_RANKS, NS, seed=0)
    for name in MIXED_SHAPES:
        W1 = ref.weighted_sum([P(u.adapters[name]) for u in rnd.updates], [0.25] * 4)
        G = agg.global_delta(rnd.new)[name]
        assert G.inner_dim == 6
        assert ref.rel_err(fdense(G), ref.top_r(W1, 6)) < 1e-5


# ------------------------------------------------------------------- HetLoRA
@pytest.mark.parametrize("rslora,weighting", [(False, "uniform"), (True, "uniform"), (False, "data_size")])
def test_hetlora_padding_and_norm_weights(rslora, weighting):
    """w_k ∝ p_k·‖s_k·B_k·A_k‖: the paper's norms, times the base weights of ``weighting``."""
    alpha = 24.0
    agg, state = make("hetlora", MIXED_SHAPES, rank=16, alpha=alpha, rslora=rslora, weighting=weighting)
    base = ref.data_weights(NS) if weighting == "data_size" else [0.25] * 4
    s = ref.lora_scale(alpha, 16, rslora)
    for t in range(3):
        G0 = {n: (ref.d(a.B), ref.d(a.A)) for n, a in state.adapters.items()}
        rnd = run_round(agg, state, MIXED_RANKS, NS, seed=t)
        for st, r in zip(rnd.starts, MIXED_RANKS):  # client k trains the truncated global adapter
            for name, a in st.adapters.items():
                B0, A0 = G0[name]
                assert a.scale == pytest.approx(ref.lora_scale(alpha, r, rslora))
                assert ref.rel_err(P(a), s * B0[:, :r] @ A0[:r]) < 1e-6
        for name, (m, n) in MIXED_SHAPES.items():
            loc = [u.adapters[name] for u in rnd.updates]
            norms = [ref.frob(P(a)) for a in loc]
            w = ref.normalised([x * b for x, b in zip(norms, base)])
            Bp = [torch.cat([ref.d(a.B) * (a.scale / s), torch.zeros(m, 16 - a.rank, dtype=torch.float64)], 1) for a in loc]
            Ap = [torch.cat([ref.d(a.A), torch.zeros(16 - a.rank, n, dtype=torch.float64)], 0) for a in loc]
            g = rnd.new.adapters[name]
            assert g.scale == pytest.approx(s) and g.rank == 16
            assert rnd.new.info["hetlora_weights"][name] == pytest.approx(w, rel=1e-6)
            assert ref.rel_err(g.B, ref.weighted_sum(Bp, w)) < 1e-6
            assert ref.rel_err(g.A, ref.weighted_sum(Ap, w)) < 1e-6
        state = rnd.new


def test_hetlora_zero_products_fall_back_to_base_weights():
    agg, state = make("hetlora", MIXED_SHAPES, rank=16)
    starts, _ = client_round(agg, state, MIXED_RANKS, NS, seed=0)
    # untrained clients: B = 0, so every product is zero
    updates = [ClientUpdate(f"c{i}", n, s.adapters) for i, (s, n) in enumerate(zip(starts, NS))]
    new = agg.aggregate(state, updates)
    for name in MIXED_SHAPES:
        assert new.info["hetlora_weights"][name] == pytest.approx(ref.data_weights(NS))


@pytest.mark.parametrize("r,gamma", [(8, 0.25), (5, 0.1), (4, 0.5), (3, 1.0)])
def test_hetlora_tail_norm(r, gamma):
    g = torch.Generator().manual_seed(r)
    B = torch.randn(7, r, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(r, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = max(1, math.ceil(gamma * r))
    want = torch.linalg.norm(B[:, r - t :] @ A[r - t :])
    got = tail_norm(B, A, gamma)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    # differentiable, with the dense expression's gradient
    gB, gA = torch.autograd.grad(got, (B, A))
    wB, wA = torch.autograd.grad(want, (B, A))
    assert torch.allclose(gB, wB, atol=1e-12) and torch.allclose(gA, wA, atol=1e-12)
    assert torch.count_nonzero(gB[:, : r - t]) == 0


def test_hetlora_tail_norm_hand_value():
    B = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    A = torch.tensor([[1.0, 1.0], [0.0, 1.0], [3.0, 4.0]])
    # γ = 0.3 → t = ⌈0.9⌉ = 1: B[:, 2:]·A[2:] = [[6, 8], [0, 0]], norm 10
    assert float(tail_norm(B, A, 0.3)) == pytest.approx(10.0)


@pytest.mark.parametrize(
    "rank,now,before,gamma,min_rank,want",
    [
        (8, 0.5, 1.0, 0.25, 1, 6),  # shrank: drop ⌈2⌉ = 2
        (8, 1.0, 0.5, 0.25, 1, 8),  # grew: keep
        (8, 1.0, 1.0, 0.25, 1, 8),  # equal: keep
        (5, 0.1, 1.0, 0.1, 1, 4),  # ⌈0.5⌉ = 1
        (2, 0.1, 1.0, 0.9, 1, 1),  # floor at min_rank
        (6, 0.1, 1.0, 0.5, 4, 4),
        (10, 0.0, 2.0, 0.33, 1, 6),  # ⌈3.3⌉ = 4
    ],
)
def test_hetlora_pruned_rank(rank, now, before, gamma, min_rank, want):
    assert pruned_rank(rank, now, before, gamma, min_rank) == want


@pytest.mark.parametrize("rslora", [False, True])
def test_hetlora_self_prune_keeps_the_head_components_at_the_new_scaling(rslora):
    """Rank 4, γ = 0.5 (t = 2): the tail sum over both modules shrank over the round, so each module's
    first two components go on, B' = B[:, :2]·s_4/s_2 at s_2: s_2·B'·A' = s_4·B[:, :2]·A[:2] (by hand,
    float64). Had the tail grown, the trained adapters go back as they were."""
    from fedlora.core.methods.hetlora import self_prune
    from fedlora.core.state import SelfPruning

    lora = LoraSpec(alpha=8.0, rslora=rslora)
    g = torch.Generator().manual_seed(4)
    s4 = lora.scale(4)
    start = {m: Adapter(torch.randn(6, 4, generator=g), torch.randn(4, 5, generator=g), s4) for m in ("q", "v")}
    shrunk = {m: Adapter(torch.cat([a.B[:, :2] + 0.1, a.B[:, 2:] * 0.1], dim=1), a.A.clone(), s4) for m, a in start.items()}
    pruning = SelfPruning(gamma=0.5, strength=1.0, min_rank=1, lora=lora)
    out = self_prune(start, shrunk, pruning)
    for m, a in shrunk.items():
        b = out[m]
        assert b.rank == 2 and b.scale == pytest.approx(lora.scale(2))
        want = s4 * ref.d(a.B[:, :2]) @ ref.d(a.A[:2])
        assert ref.rel_err(b.scale * ref.d(b.B) @ ref.d(b.A), want) < 1e-6
    grown = {m: Adapter(torch.cat([a.B[:, :2], a.B[:, 2:] * 3], dim=1), a.A.clone(), s4) for m, a in start.items()}
    assert self_prune(start, grown, pruning) is grown
    # one module's tail shrinking is not enough when the sum over modules grew
    mixed = {"q": shrunk["q"], "v": Adapter(torch.cat([start["v"].B[:, :2], start["v"].B[:, 2:] * 3], dim=1), start["v"].A, s4)}
    assert self_prune(start, mixed, pruning) is mixed


def test_hetlora_with_self_pruning_sends_each_client_the_rank_it_last_sent():
    agg, state = make("hetlora", SHAPES, rank=4, prune_gamma=0.5)
    assert agg.assigned_rank(state, "c0", 4) == 4
    _, updates = client_round(agg, state, [4, 4], NS[:2], seed=1)
    half = {n: Adapter(a.B[:, :2] * (a.scale / state.lora.scale(2)), a.A[:2], state.lora.scale(2)) for n, a in updates[0].adapters.items()}
    new = agg.aggregate(state, [ClientUpdate(updates[0].client_id, updates[0].num_examples, half), updates[1]])
    assert agg.assigned_rank(new, updates[0].client_id, 4) == 2 and agg.assigned_rank(new, updates[1].client_id, 4) == 4
    assert agg.client_start(new, 2).prune is not None and agg.client_start(new, 2).adapters["q"].rank == 2
    plain, _ = make("hetlora", SHAPES, rank=4)
    assert plain.client_start(state).prune is None


# -------------------------------------------------------------------- FedSVD
def test_fedsvd_averages_B_keeps_the_product_and_orthonormalises_A():
    """Dense float64 reference: s·B'·A' = s·(Σ p_i·B_i)·A, A' has orthonormal rows, A is frozen."""
    agg, state = make("fedsvd", SHAPES, rank=4)
    for t in range(3):
        rnd = run_round(agg, state, [None] * 4, NS, seed=t)
        assert all(not s.train_A for s in rnd.starts)
        for name in SHAPES:
            g0, g = state.adapters[name], rnd.new.adapters[name]
            B = ref.weighted_sum([u.adapters[name].B for u in rnd.updates], ref.data_weights(NS))
            want = g0.scale * ref.d(B) @ ref.d(g0.A)
            assert ref.rel_err(P(g), want) < 1e-5
            A = ref.d(g.A)
            assert torch.allclose(A @ A.T, torch.eye(4, dtype=torch.float64), atol=1e-5)
            assert ref.rel_err(g.A, g0.A) > 1e-2, "A moved to the product's row space"
        assert rnd.new.base_delta == {}
        state = rnd.new
    _, updates = client_round(agg, state, [None] * 2, NS[:2], seed=9)
    moved = ClientUpdate("c1", 5, {n: Adapter(a.B, a.A + 0.1, a.scale) for n, a in updates[1].adapters.items()})
    with pytest.raises(UpdateError, match="'c1'.*A was changed"):
        agg.aggregate(state, [updates[0], moved])


# -------------------------------------------------------------------- RoLoRA
def test_rolora_alternates_B_and_A_and_is_exact():
    agg, state = make("rolora", SHAPES, rank=4)
    for t in range(4):
        rnd = run_round(agg, state, [None] * 4, NS, seed=t)
        trains_B = t % 2 == 0
        assert all(s.train_B == trains_B and s.train_A == (not trains_B) for s in rnd.starts)
        for name in SHAPES:
            g0, g = state.adapters[name], rnd.new.adapters[name]
            want = ref.weighted_sum([P(u.adapters[name]) for u in rnd.updates], ref.data_weights(NS))  # Σ p_i·s·B_i·A_i
            assert ref.rel_err(P(g), want) < 1e-5
            assert torch.equal(g.A if trains_B else g.B, g0.A if trains_B else g0.B)
        state = rnd.new
    _, updates = client_round(agg, state, [None] * 2, NS[:2], seed=9)  # round 4 trains B: A is frozen
    moved = ClientUpdate("c1", 5, {n: Adapter(a.B, a.A + 0.1, a.scale) for n, a in updates[1].adapters.items()})
    with pytest.raises(UpdateError, match="'c1'.*A was changed"):
        agg.aggregate(state, [updates[0], moved])


# -------------------------------------------------------------------- Fed-SB
def test_fedsb_fixes_the_frames_in_round_one_then_averages_the_core_exactly():
    """Round 1: s·B'·A' = the top-r part of Σ p_i·s·B_i·A_i (the rest folded), frames U and Vᵀ
    orthonormal. Later rounds: only R in B = U·R trains, A and span(B) stay, the product is exact."""
    agg, state = make("fedsb", SHAPES, rank=3)
    w = ref.data_weights(NS)
    first = run_round(agg, state, [None] * 4, NS, seed=0)
    assert all(s.train_A and s.train_B and not s.train_core for s in first.starts)
    frames = {}
    for name in SHAPES:
        M = ref.weighted_sum([P(u.adapters[name]) for u in first.updates], w)
        g = first.new.adapters[name]
        assert ref.rel_err(P(g), ref.top_r(M, 3)) < 1e-5
        assert ref.rel_err(ref.mat(first.new.base_delta[name].L, first.new.base_delta[name].R), M - ref.top_r(M, 3)) < 1e-5
        A = ref.d(g.A)
        assert torch.allclose(A @ A.T, torch.eye(3, dtype=torch.float64), atol=1e-5)
        frames[name] = torch.linalg.qr(ref.d(g.B))[0]
    state = first.new
    for t in range(1, 3):
        rnd = run_round(agg, state, [None] * 4, NS, seed=t)
        assert all(s.train_core and not s.train_A for s in rnd.starts)
        for name in SHAPES:
            g0, g = state.adapters[name], rnd.new.adapters[name]
            want = ref.weighted_sum([P(u.adapters[name]) for u in rnd.updates], w)
            assert ref.rel_err(P(g), want) < 1e-5 and rnd.new.base_delta == {}
            assert torch.equal(g.A, g0.A)
            U, B = frames[name], ref.d(g.B)
            assert ref.rel_err(U @ (U.T @ B), B) < 1e-5 and ref.rel_err(g.B, g0.B) > 1e-3, "B moved, inside the round-1 frame"
        state = rnd.new
    _, updates = client_round(agg, state, [None] * 2, NS[:2], seed=9)
    free = ClientUpdate("c1", 5, {n: Adapter(a.B + 0.5 * torch.randn(a.B.shape), a.A, a.scale) for n, a in updates[1].adapters.items()})
    with pytest.raises(UpdateError, match="'c1'.*B left Fed-SB's fixed column space"):
        agg.aggregate(state, [updates[0], free])
    moved = ClientUpdate("c1", 5, {n: Adapter(a.B, a.A + 0.1, a.scale) for n, a in updates[1].adapters.items()})
    with pytest.raises(UpdateError, match="'c1'.*A was changed"):
        agg.aggregate(state, [updates[0], moved])


def test_fedsb_refuses_a_first_round_too_poor_to_fix_its_frames():
    agg, state = make("fedsb", SHAPES, rank=3)
    untrained = [ClientUpdate(f"c{i}", 5, {n: a.clone() for n, a in agg.client_start(state).adapters.items()}) for i in range(2)]  # B = 0
    with pytest.raises(AggregationError, match="rank 0 < r = 3"):
        agg.aggregate(state, untrained)
