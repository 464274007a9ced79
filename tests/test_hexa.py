"""HEXA: folded mixed-rank starts, restart options, drift weights, class-aware heads — dense float64."""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from helpers import MIXED_RANKS, MIXED_SHAPES, assert_unchanged, client_round, fdense, global_after, snapshot

from fedlora.core import Adapter, ClientUpdate, LoraSpec, UpdateError, get_aggregator

NS = [30, 10, 45, 15]
R = 16


def P(a: Adapter):
    return ref.product(a.B, a.A, a.scale)


def random_global(agg, alpha=12.0, rslora=False, seed=0, shapes=MIXED_SHAPES, rank=R, dense=None):
    """A HEXA state whose global adapter is a random (non-zero) rank-r adapter."""
    state = agg.init_state(shapes, rank, LoraSpec(alpha, rslora), dense=dense, seed=seed)
    g = torch.Generator().manual_seed(seed + 77)
    s = ref.lora_scale(alpha, rank, rslora)
    adapters = {n: Adapter(0.3 * torch.randn(m, rank, generator=g), torch.randn(rank, k, generator=g) / math.sqrt(k), s) for n, (m, k) in shapes.items()}
    return state.evolve(adapters=adapters)


def hand_views(state, update, fold=True):
    """(B̃_i, Ã_i) at the global scaling, float64, built by hand from the global adapter."""
    out = {}
    for name, g in state.adapters.items():
        a = update.adapters[name]
        m, n = g.shape
        r_i = a.rank
        B = ref.d(a.B) * (a.scale / g.scale)
        A = ref.d(a.A)
        if r_i < g.rank:
            tB = ref.d(g.B[:, r_i:]) if fold else torch.zeros(m, g.rank - r_i, dtype=torch.float64)
            tA = ref.d(g.A[r_i:]) if fold else torch.zeros(g.rank - r_i, n, dtype=torch.float64)
            B, A = torch.cat([B, tB], 1), torch.cat([A, tA], 0)
        out[name] = (B, A)
    return out


def hand_delta(state, update, fold=True):
    """ΔW_i = s·B̃_i·Ã_i (the client's effective delta), dense."""
    return {n: state.adapters[n].scale * B @ A for n, (B, A) in hand_views(state, update, fold).items()}


# -------------------------------------------------------------- downloads
@pytest.mark.parametrize("rslora", [False, True])
def test_fold_start_is_exactly_the_global_model(rslora):
    agg = get_aggregator("hexa")
    state = random_global(agg, alpha=10.0, rslora=rslora)
    for r in [1, 2, 4, 8, 16]:
        st = agg.client_start(state, r)
        for name, g in state.adapters.items():
            a = st.adapters[name]
            assert a.rank == r and a.scale == pytest.approx(ref.lora_scale(10.0, r, rslora))
            glob = P(g)
            tail = g.scale * ref.d(g.B[:, r:]) @ ref.d(g.A[r:])
            if r < R:
                assert ref.rel_err(fdense(st.base_delta[name]), tail) < 1e-6
                assert ref.rel_err(fdense(st.base_delta[name]) + P(a), glob) < 1e-6
            else:
                assert name not in st.base_delta
                assert ref.rel_err(P(a), glob) < 1e-6
            assert ref.rel_err(P(a), g.scale * ref.d(g.B[:, :r]) @ ref.d(g.A[:r])) < 1e-6


@pytest.mark.parametrize("rank", [4, R])
def test_a_client_training_its_start_in_place_leaves_the_server_alone(rank):
    """The start is the client's to train: A, the tail and the head are copies, not views of the
    server's state (a client that edited them in place moved the global model)."""
    agg = get_aggregator("hexa")
    state = random_global(agg, dense={"head.weight": torch.ones(2, 3)})
    before = {n: (g.B.clone(), g.A.clone()) for n, g in state.adapters.items()}
    start = agg.client_start(state, rank)
    for name, a in start.adapters.items():
        a.A.add_(1.0)
        a.B.add_(1.0)
        if name in start.base_delta:
            start.base_delta[name].R.add_(1.0)
    start.dense["head.weight"].add_(1.0)
    for name, g in state.adapters.items():
        assert torch.equal(g.B, before[name][0]) and torch.equal(g.A, before[name][1])
    assert torch.equal(state.dense["head.weight"], torch.ones(2, 3))


def test_updates_that_cancel_leave_the_base_weights():
    """Δ̄ = 0 (one client +E, one −E, one idle): there is no consensus to drift from, so every d_i = 0
    and the weights are the base ones (they handed the idle client everything, or NaN when scaled)."""
    agg = get_aggregator("hexa", weighting="uniform")
    state = random_global(agg, shapes={"q": (8, 6)}, rank=4)
    g = state.adapters["q"]
    E = 0.5 * torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    for size in (1.0, 1e5):
        updates = [ClientUpdate(f"c{i}", 10, {"q": Adapter(g.B + sign * size * E, g.A.clone(), g.scale)}) for i, sign in enumerate((1.0, -1.0, 0.0))]
        new = agg.aggregate(state, updates)
        assert new.info["drift"] == [0.0, 0.0, 0.0]
        assert new.info["hexa_weights"] == pytest.approx([1 / 3] * 3)


def test_truncate_start_drops_the_tail():
    agg = get_aggregator("hexa", mixed_ranks="truncate")
    state = random_global(agg)
    for r in [2, 8]:
        st = agg.client_start(state, r)
        assert dict(st.base_delta) == {}
        for name, g in state.adapters.items():
            assert ref.rel_err(P(st.adapters[name]), g.scale * ref.d(g.B[:, :r]) @ ref.d(g.A[:r])) < 1e-6


def test_client_start_rank_out_of_range():
    agg = get_aggregator("hexa")
    state = random_global(agg)
    for r in (0, R + 1):
        with pytest.raises(ValueError):
            agg.client_start(state, r)


# ---------------------------------------------------------------- restarts
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_mean_restart_is_weighted_mean_of_padded_factors(fold, rslora):
    agg = get_aggregator("hexa", drift_beta=0.0, mixed_ranks="fold" if fold else "truncate")
    state = random_global(agg, rslora=rslora, seed=1)
    starts, updates = client_round(agg, state, MIXED_RANKS, NS, seed=3)
    new = agg.aggregate(state, updates)
    w = ref.data_weights(NS)
    assert new.info["hexa_weights"] == pytest.approx(w)
    views = [hand_views(state, u, fold) for u in updates]
    deltas = [hand_delta(state, u, fold) for u in updates]
    for name in MIXED_SHAPES:
        g = new.adapters[name]
        B = ref.weighted_sum([v[name][0] for v in views], w)
        A = ref.weighted_sum([v[name][1] for v in views], w)
        assert g.rank == R and g.scale == pytest.approx(state.adapters[name].scale)
        assert ref.rel_err(g.B, B) < 1e-6 and ref.rel_err(g.A, A) < 1e-6
        M = ref.weighted_sum([dl[name] for dl in deltas], w)
        assert ref.frob(fdense(new.base_delta[name]) - (M - g.scale * B @ A)) < 1e-5 * ref.frob(M)
        assert ref.rel_err(global_after(agg, new, name), M) < 1e-5


@pytest.mark.parametrize("restart", ["svd_sqrt", "svd_a_scale"])
@pytest.mark.parametrize("seed", [0, 1])
def test_svd_restarts_are_dense_top_r(restart, seed):
    agg = get_aggregator("hexa", drift_beta=0.0, restart=restart)
    state = random_global(agg, seed=seed)
    _, updates = client_round(agg, state, MIXED_RANKS, NS, seed=seed + 10)
    new = agg.aggregate(state, updates)
    w = ref.data_weights(NS)
    views = [hand_views(state, u) for u in updates]
    for name in MIXED_SHAPES:
        s = state.adapters[name].scale
        M = ref.weighted_sum([s * v[name][0] @ v[name][1] for v in views], w)
        g = new.adapters[name]
        assert ref.rel_err(P(g), ref.top_r(M, R)) < 1e-5
        # the residual is the SVD tail M − M_r (zero when r = min(m, n)); measured against ‖M‖
        assert ref.frob(fdense(new.base_delta[name]) - (M - ref.top_r(M, R))) < 1e-5 * ref.frob(M)
        assert ref.rel_err(global_after(agg, new, name), M) < 1e-5
        B, A = ref.d(g.B), ref.d(g.A)
        if restart == "svd_sqrt":
            assert torch.allclose(B.T @ B, A @ A.T, atol=1e-5 * float((A @ A.T).abs().max()))
        else:  # rows of A' all have the mean A's row scale c = ‖Ā‖_F/√r
            A_mean = ref.weighted_sum([v[name][1] for v in views], w)
            c = ref.frob(A_mean) / math.sqrt(R)
            assert torch.allclose(A.norm(dim=1), torch.full((R,), c, dtype=torch.float64), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_lstsq_restart(seed):
    agg = get_aggregator("hexa", drift_beta=0.0, restart="lstsq")
    state = random_global(agg, seed=seed)
    _, updates = client_round(agg, state, MIXED_RANKS, NS, seed=seed + 20)
    new = agg.aggregate(state, updates)
    w = ref.data_weights(NS)
    views = [hand_views(state, u) for u in updates]
    for name in MIXED_SHAPES:
        s = state.adapters[name].scale
        M = ref.weighted_sum([s * v[name][0] @ v[name][1] for v in views], w)
        A_mean = ref.weighted_sum([v[name][1] for v in views], w)
        g = new.adapters[name]
        assert ref.rel_err(g.A, A_mean) < 1e-6
        assert ref.rel_err(g.B, M @ torch.linalg.pinv(A_mean) / s) < 1e-4
        assert ref.rel_err(global_after(agg, new, name), M) < 1e-5


def test_fold_residual_off_keeps_restart_but_ships_nothing():
    on = get_aggregator("hexa", drift_beta=0.0)
    off = get_aggregator("hexa", drift_beta=0.0, fold_residual=False)
    state = random_global(on, seed=4)
    _, updates = client_round(on, state, MIXED_RANKS, NS, seed=4)
    a, b = on.aggregate(state, updates), off.aggregate(state, updates)
    assert dict(b.base_delta) == {}
    for name in MIXED_SHAPES:
        assert torch.allclose(a.adapters[name].B, b.adapters[name].B)
        assert torch.allclose(a.adapters[name].A, b.adapters[name].A)


# ------------------------------------------------------------------- drift
@pytest.mark.parametrize("beta", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("restart", ["mean", "svd_sqrt", "lstsq"])
@pytest.mark.parametrize("weighting", ["data_size", "uniform"])
def test_drift_weights_match_dense_and_round_is_exact(beta, restart, weighting):
    agg = get_aggregator("hexa", drift_beta=beta, restart=restart, weighting=weighting)
    state = random_global(agg, seed=2)
    g = torch.Generator().manual_seed(5)
    starts, updates = client_round(agg, state, MIXED_RANKS, NS, seed=6)
    # make client 3 an outlier so the weights really move
    bad = {n: Adapter(a.B + 2.0 * torch.randn(a.B.shape, generator=g), a.A, a.scale) for n, a in updates[3].adapters.items()}
    updates[3] = ClientUpdate("c3", NS[3], bad)
    snap = snapshot(state)
    new = agg.aggregate(state, updates)
    assert_unchanged(state, snap)
    q = ref.data_weights(NS) if weighting == "data_size" else ref.uniform_weights(4)
    G = {n: P(a) for n, a in state.adapters.items()}
    deltas = [hand_delta(state, u) for u in updates]
    rel = [{n: dl[n] - G[n] for n in dl} for dl in deltas]  # Δ_i = ΔW_i − global delta
    dist = ref.drift(rel, q)
    p = ref.drift_weights(dist, q, beta)
    assert new.info["drift"] == pytest.approx(dist, rel=1e-5)
    assert new.info["hexa_weights"] == pytest.approx(p, rel=1e-5)
    assert new.info["weights"] == pytest.approx(q)
    assert p[3] < q[3] * 0.9  # the outlier lost weight
    assert new.info["hexa_effective_clients"] == pytest.approx(1.0 / sum(x * x for x in p), rel=1e-5)
    reported = new.info["hexa_weights"]
    for name in MIXED_SHAPES:
        got = global_after(agg, new, name)
        assert ref.rel_err(got, ref.weighted_sum([dl[name] for dl in deltas], reported)) < 1e-5
        assert ref.rel_err(got, ref.weighted_sum([dl[name] for dl in deltas], p)) < 1e-5


def test_drift_identical_clients_keep_base_weights():
    agg = get_aggregator("hexa", drift_beta=2.0)
    state = random_global(agg, seed=3)
    _, updates = client_round(agg, state, [R], [1], seed=1)
    same = [ClientUpdate(f"c{i}", n, updates[0].adapters) for i, n in enumerate([1, 2, 3])]
    new = agg.aggregate(state, same)
    assert new.info["drift"] == pytest.approx([0.0] * 3, abs=1e-5)
    assert new.info["hexa_weights"] == pytest.approx(ref.data_weights([1, 2, 3]), rel=1e-5)
    assert new.info["hexa_effective_clients"] == pytest.approx(36 / 14, rel=1e-5)  # 1/Σ(n_i/6)² for n = 1, 2, 3


# -------------------------------------------------------- class-aware head
def test_class_aware_head_hand_case():
    C, H = 3, 4
    dense = {"head.weight": torch.zeros(C, H), "head.bias": torch.zeros(C), "pooler.weight": torch.zeros(H, H)}
    agg = get_aggregator("hexa", class_aware_head=True, head_keys=("head.weight", "head.bias"))
    state = random_global(agg, shapes={"q": (8, 6)}, rank=2, dense=dense)
    ns = [10, 20, 30]
    counts = [torch.tensor([4, 6, 0]), torch.tensor([0, 20, 0]), torch.tensor([30, 0, 0])]
    g = torch.Generator().manual_seed(0)
    thetas = [{k: torch.randn(v.shape, generator=g) for k, v in dense.items()} for _ in ns]
    _, ups = client_round(agg, state, [None] * 3, ns, seed=0)
    updates = [ClientUpdate(f"c{i}", n, u.adapters, dense=th, label_counts=lc) for i, (n, u, th, lc) in enumerate(zip(ns, ups, thetas, counts))]
    new = agg.aggregate(state, updates)
    # per-class weights by hand: class 0 → (4, 0, 30)/34, class 1 → (6, 20, 0)/26, class 2 unseen → n_i/60
    Wc = torch.tensor([[4 / 34, 6 / 26, 10 / 60], [0.0, 20 / 26, 20 / 60], [30 / 34, 0.0, 30 / 60]], dtype=torch.float64)  # (client, class)
    for key in ("head.weight", "head.bias"):
        want = torch.stack([sum(Wc[i, c] * ref.d(thetas[i][key][c]) for i in range(3)) for c in range(C)])
        assert ref.rel_err(new.dense[key], want) < 1e-6
    p = ref.data_weights(ns)
    assert ref.rel_err(new.dense["pooler.weight"], ref.weighted_sum([t["pooler.weight"] for t in thetas], p)) < 1e-6
    # row 0 ignores client 1 completely: changing its row-0 values changes nothing there
    thetas[1]["head.weight"][0] += 100.0
    updates[1] = ClientUpdate("c1", 20, ups[1].adapters, dense=thetas[1], label_counts=counts[1])
    new2 = agg.aggregate(state, updates)
    assert torch.allclose(new2.dense["head.weight"][0], new.dense["head.weight"][0], atol=1e-5)


def test_class_aware_head_needs_label_counts():
    dense = {"head.weight": torch.zeros(3, 4), "head.bias": torch.zeros(3)}
    agg = get_aggregator("hexa", class_aware_head=True, head_keys=("head.weight", "head.bias"))
    state = random_global(agg, shapes={"q": (8, 6)}, rank=2, dense=dense)
    _, ups = client_round(agg, state, [None] * 2, [1, 2], seed=0)
    updates = [ClientUpdate("a", 1, ups[0].adapters, dense=dense, label_counts=torch.tensor([1, 0, 0])), ClientUpdate("b", 2, ups[1].adapters, dense=dense)]
    snap = snapshot(state)
    with pytest.raises(UpdateError) as e:
        agg.aggregate(state, updates)
    assert e.value.client == "b" and "'b'" in str(e.value)
    assert_unchanged(state, snap)
    bad = [updates[0], ClientUpdate("b", 2, ups[1].adapters, dense=dense, label_counts=torch.tensor([1, -1, 0]))]
    with pytest.raises(UpdateError):
        agg.aggregate(state, bad)
    assert_unchanged(state, snap)


@pytest.mark.parametrize("beta", [1.0, 5.0])
def test_drift_nearly_cancelling_updates_are_aggregated(beta):
    """Updates that almost cancel make every d_i huge; the round must still aggregate (no exp underflow)."""
    agg = get_aggregator("hexa", drift_beta=beta)
    state = random_global(agg, seed=8)
    starts, _ = client_round(agg, state, [R, R], [1, 1], seed=0)
    g = torch.Generator().manual_seed(1)
    ns = [2, 3]
    E = {n: torch.randn(a.B.shape, generator=g) for n, a in starts[0].adapters.items()}
    # Σ q_i·Δ_i ≈ 0: Δ_0 ∝ E, Δ_1 ∝ −(2/3)(1 + 1e-4)·E
    mult = [1.0, -(2.0 / 3.0) * (1 + 1e-4)]
    updates = []
    for i, (st, n, c) in enumerate(zip(starts, ns, mult)):
        ad = {k: Adapter(a.B + c * E[k], a.A, a.scale) for k, a in st.adapters.items()}
        updates.append(ClientUpdate(f"c{i}", n, ad))
    new = agg.aggregate(state, updates)
    q = ref.data_weights(ns)
    G = {n: P(a) for n, a in state.adapters.items()}
    deltas = [hand_delta(state, u) for u in updates]
    dist = ref.drift([{n: dl[n] - G[n] for n in dl} for dl in deltas], q)
    assert min(dist) * beta > 800  # exp(−β·d_i) underflows to 0.0 for every client
    p = ref.drift_weights(dist, q, beta)
    assert new.info["drift"] == pytest.approx(dist, rel=1e-3)
    assert new.info["hexa_weights"] == pytest.approx(p, abs=1e-6)
    for name in MIXED_SHAPES:
        want = ref.weighted_sum([dl[name] for dl in deltas], new.info["hexa_weights"])
        assert ref.rel_err(global_after(agg, new, name), want) < 1e-5


# -------------------------------------------------------- server momentum (f)
def momentum_rounds(agg, rounds=4, seed=0, dense_shape=(3, 5)):
    """Runs ``rounds`` HEXA rounds (mixed ranks, random heads) and, beside them, FedAvgM by hand in
    dense float64 on what the clients sent: v_t = μ·v_{t−1} + Δ_t, W_{t+1} = W_t + v_t, with
    Δ_t = Σ_i p_i·ΔW_i − G_t and p the weights the round reports (the drift's, tested above).
    Returns the package's models (Σ folded base deltas + the global adapter) and the reference's."""
    mu = agg.server_momentum
    dense = {"head.weight": torch.zeros(dense_shape)}
    state = random_global(agg, seed=seed, dense=dense)
    g = torch.Generator().manual_seed(seed + 11)
    folded = {n: torch.zeros(shape, dtype=torch.float64) for n, shape in MIXED_SHAPES.items()}
    W = {n: P(a) for n, a in state.adapters.items()}  # the reference model (on top of W0)
    head = ref.d(state.dense["head.weight"])
    v = {n: torch.zeros_like(w) for n, w in W.items()}
    v_head = torch.zeros_like(head)
    got, want = [], []
    for t in range(rounds):
        _, ups = client_round(agg, state, MIXED_RANKS, NS, seed=100 * seed + t)
        thetas = [state.dense["head.weight"] + torch.randn(dense_shape, generator=g) for _ in ups]
        updates = [ClientUpdate(u.client_id, u.num_examples, u.adapters, dense={"head.weight": th}) for u, th in zip(ups, thetas)]
        new = agg.aggregate(state, updates)
        p = new.info["hexa_weights"]
        q = new.info["weights"]
        deltas = [hand_delta(state, u) for u in updates]
        for n in W:
            step = ref.weighted_sum([dl[n] for dl in deltas], p) - P(state.adapters[n])
            v[n] = mu * v[n] + step
            W[n] = W[n] + v[n]
            if n in new.base_delta:
                folded[n] = folded[n] + fdense(new.base_delta[n])
        v_head = mu * v_head + ref.weighted_sum(thetas, q) - head
        head = head + v_head
        got.append(({n: folded[n] + P(a) for n, a in new.adapters.items()}, ref.d(new.dense["head.weight"])))
        want.append((dict(W), head.clone()))
        state = new
    return state, got, want


@pytest.mark.parametrize("restart", ["mean", "svd_sqrt"])
@pytest.mark.parametrize("mu", [0.5, 0.9])
def test_server_momentum_is_fedavgm_on_the_exact_aggregate(restart, mu):
    agg = get_aggregator("hexa", restart=restart, server_momentum=mu)
    state, got, want = momentum_rounds(agg)
    for (gw, gh), (ww, wh) in zip(got, want):
        for n in MIXED_SHAPES:
            assert ref.rel_err(gw[n], ww[n]) < 1e-5
        assert ref.rel_err(gh, wh) < 1e-6
    # the buffer kept is v_t itself (nothing truncated at momentum_rank=0), and it is not zero
    assert state.info["momentum_norm"] > 0 and "momentum_truncation" not in state.info
    # a round without momentum is a different model: the test can tell them apart
    plain = momentum_rounds(get_aggregator("hexa", restart=restart))[1]
    assert ref.rel_err(plain[-1][0]["q"], want[-1][0]["q"]) > 1e-2


def test_server_momentum_buffer_is_exact_when_the_round_moves_little():
    """A round that moves the model by ≈ 3e-5 of the global product: the first buffer v_1 = Δ_1 =
    Σ p_i·ΔW_i − G (dense float64) to 1e-5 relative (≈ 4e-7 measured). Built from the stacked products,
    whose float32 round-off is of ‖G‖'s size, it was off by 7e-3 here; from the differences B̃_i − B₀
    and Ā − A₀ it is not (equal ranks: a mixed-rank client's B_i·s_i/s is itself rounded to float32
    at ‖G‖'s scale)."""
    agg = get_aggregator("hexa", server_momentum=0.5)
    state = random_global(agg)
    _, ups = client_round(agg, state, [R] * 4, NS, seed=5, noise=1e-5)
    new = agg.aggregate(state, ups)
    p = new.info["hexa_weights"]
    for n in MIXED_SHAPES:
        step = ref.weighted_sum([hand_delta(state, u)[n] for u in ups], p) - P(state.adapters[n])
        assert ref.frob(step) < 1e-4 * ref.frob(P(state.adapters[n]))  # the round moves little
        assert ref.rel_err(fdense(new.extra["momentum"][n]), step) < 1e-5


def test_server_momentum_survives_serialisation():
    from fedlora.core.serialize import state_from_dict, state_to_dict

    agg = get_aggregator("hexa", server_momentum=0.7)
    state, *_ = momentum_rounds(agg, rounds=2)
    back = state_from_dict(state_to_dict(state))
    for n, f in state.extra["momentum"].items():
        assert ref.rel_err(fdense(back.extra["momentum"][n]), fdense(f)) == 0
    _, ups = client_round(agg, state, MIXED_RANKS, NS, seed=9)
    ups = [ClientUpdate(u.client_id, u.num_examples, u.adapters, dense=dict(state.dense)) for u in ups]
    a, b = agg.aggregate(state, ups), agg.aggregate(back, ups)
    for n in MIXED_SHAPES:
        assert torch.equal(fdense(a.base_delta[n]), fdense(b.base_delta[n]))


def test_server_momentum_rank_keeps_the_top_of_the_buffer():
    """momentum_rank = k keeps v_t's best rank-k approximation (Eckart–Young, against a dense
    float64 SVD of μ·ṽ_{t−1} + Δ_t) and reports the share of ‖v_t‖² it drops."""
    k = 3
    agg = get_aggregator("hexa", drift_beta=0.0, server_momentum=0.6, momentum_rank=k)
    state = random_global(agg, seed=4)
    dropped = total = 0.0
    for t in range(3):
        _, ups = client_round(agg, state, MIXED_RANKS, NS, seed=40 + t)
        new = agg.aggregate(state, ups)
        deltas = [hand_delta(state, u) for u in ups]
        p = new.info["hexa_weights"]
        dropped = total = 0.0
        for n in MIXED_SHAPES:
            full = ref.weighted_sum([dl[n] for dl in deltas], p) - P(state.adapters[n])
            if t:
                full = full + 0.6 * fdense(state.extra["momentum"][n])
            U, S, Vh = torch.linalg.svd(full)
            best = (U[:, :k] * S[:k]) @ Vh[:k]
            kept = new.extra["momentum"][n]
            assert kept.inner_dim <= k
            assert ref.rel_err(fdense(kept), best) < 1e-5
            dropped += float((S[k:] ** 2).sum())
            total += float((S**2).sum())
        assert new.info["momentum_truncation"] == pytest.approx(dropped / total, rel=1e-4)
        state = new
    assert 0 < dropped / total < 1


@pytest.mark.parametrize(
    "bad", [{"server_momentum": 1.0}, {"server_momentum": -0.1}, {"server_momentum": float("nan")}, {"momentum_rank": -1}, {"momentum_rank": 2.5}]
)
def test_server_momentum_bad_options(bad):
    with pytest.raises(ValueError, match="server_momentum|momentum_rank"):
        get_aggregator("hexa", **bad)


def test_class_aware_head_keys_that_are_not_dense_parameters_are_named():
    dense = {"head.weight": torch.zeros(3, 4), "head.bias": torch.zeros(3)}
    agg = get_aggregator("hexa", class_aware_head=True, head_keys=("head.weights", "head.bias"))
    state = random_global(agg, shapes={"q": (8, 6)}, rank=2, dense=dense)
    _, ups = client_round(agg, state, [None] * 2, [1, 2], seed=0)
    updates = [ClientUpdate(c, n, u.adapters, dense=dense, label_counts=torch.tensor([1, 1, 0])) for c, n, u in zip("ab", (1, 2), ups, strict=True)]
    snap = snapshot(state)
    with pytest.raises(ValueError, match="'head.weights' is not among the clients' dense parameters"):
        agg.aggregate(state, updates)
    assert_unchanged(state, snap)
