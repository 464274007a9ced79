"""fedlora.core.factored against dense float64 maths."""

from __future__ import annotations

import pytest
import reference as ref
import torch

from fedlora.core.factored import SVD, Factored, pairwise_inner

F32_TOL = 2e-6
F64_TOL = 1e-12

# (m, k, n): k < min, k > m, k > n, k > both, square, k = 1
CASES = [(12, 3, 10), (5, 12, 7), (9, 11, 4), (6, 20, 6), (16, 4, 16), (8, 1, 13)]


def rnd(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def fac(m, k, n, seed=0, dtype=torch.float32):
    return Factored(rnd(m, k, seed=seed, dtype=dtype), rnd(k, n, seed=seed + 1000, dtype=dtype))


def deficient(m, n, true_rank, k, seed=0, dtype=torch.float32):
    """L·R with inner dimension k but rank true_rank (L has rank true_rank)."""
    L = rnd(m, true_rank, seed=seed, dtype=torch.float64) @ rnd(true_rank, k, seed=seed + 1, dtype=torch.float64)
    return Factored(L.to(dtype), rnd(k, n, seed=seed + 2, dtype=dtype))


def D(f: Factored):
    return ref.mat(f.L, f.R)


def tol(dtype):
    return F32_TOL if dtype == torch.float32 else F64_TOL


# ------------------------------------------------------------------ basics
@pytest.mark.parametrize("m,k,n", CASES)
def test_shape_inner_dim_numel(m, k, n):
    f = fac(m, k, n)
    assert f.shape == (m, n)
    assert f.inner_dim == k
    assert f.numel() == k * (m + n)
    assert f.dtype == torch.float32


def test_factors_must_chain():
    with pytest.raises(ValueError):
        Factored(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError):
        Factored(torch.zeros(3), torch.zeros(1, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,k,n", CASES)
def test_dense(m, k, n, dtype):
    f = fac(m, k, n, dtype=dtype)
    assert f.dense().dtype == dtype
    assert ref.rel_err(f.dense(), D(f)) < tol(dtype)
    assert f.dense(torch.float64).dtype == torch.float64
    assert ref.rel_err(f.dense(torch.float64), D(f)) < 1e-14


def test_zeros_and_zero_inner_dim():
    z = Factored.zeros(7, 5)
    assert z.shape == (7, 5) and z.inner_dim == 0 and z.numel() == 0
    assert torch.equal(z.dense(), torch.zeros(7, 5))
    assert z.norm() == 0.0
    f = fac(7, 3, 5)
    assert f.inner(z) == 0.0 and z.inner(f) == 0.0
    assert ref.rel_err((f + z).dense(), D(f)) < F32_TOL
    assert z.t().shape == (5, 7)
    assert Factored.zeros(3, 4, dtype=torch.float64).dtype == torch.float64


# ----------------------------------------------------------------- algebra
@pytest.mark.parametrize("seed", [0, 1])
def test_stack_with_and_without_coefs(seed):
    terms = [fac(9, k, 11, seed=seed * 10 + k) for k in (1, 3, 0, 5)]
    terms[2] = Factored.zeros(9, 11)
    coefs = [0.5, -2.0, 3.0, 1.25]
    s = Factored.stack(terms, coefs)
    assert s.inner_dim == 9
    want = ref.weighted_sum([D(t) for t in terms], coefs)
    assert ref.rel_err(s.dense(), want) < F32_TOL
    s1 = Factored.stack(terms)
    assert ref.rel_err(D(s1), ref.weighted_sum([D(t) for t in terms], [1, 1, 1, 1])) < F32_TOL


def test_stack_errors():
    with pytest.raises(ValueError):
        Factored.stack([])
    with pytest.raises(ValueError):
        Factored.stack([fac(4, 2, 5), fac(5, 2, 4)])


@pytest.mark.parametrize("m,k,n", CASES)
def test_add_sub_neg_scalar(m, k, n):
    a, b = fac(m, k, n, seed=1), fac(m, k + 2, n, seed=2)
    Da, Db = D(a), D(b)
    assert ref.rel_err(D(a + b), Da + Db) < F32_TOL
    assert ref.rel_err(D(a - b), Da - Db) < F32_TOL
    assert ref.rel_err(D(-a), -Da) < F32_TOL
    assert ref.rel_err(D(a * 2.5), 2.5 * Da) < F32_TOL
    assert ref.rel_err(D(-0.75 * a), -0.75 * Da) < F32_TOL
    assert (a + b).inner_dim == 2 * k + 2
    # a − a is exactly zero as a matrix even though its inner dimension is 2k
    assert ref.frob(D(a - a)) < 1e-12 * (1 + ref.frob(Da))


@pytest.mark.parametrize("m,k,n", CASES)
def test_transpose(m, k, n):
    f = fac(m, k, n)
    ft = f.t()
    assert ft.shape == (n, m)
    assert ref.rel_err(D(ft), D(f).T) < F32_TOL


def test_to_dtype():
    f = fac(6, 2, 4).to(torch.float64)
    assert f.dtype == torch.float64 and f.R.dtype == torch.float64


# ------------------------------------------------------------------ norms
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,k,n", CASES)
def test_inner_and_norm(m, k, n, dtype):
    a, b = fac(m, k, n, seed=3, dtype=dtype), fac(m, k + 1, n, seed=4, dtype=dtype)
    want = float((D(a) * D(b)).sum())
    # accumulated in float64, so only the inputs' own rounding matters
    assert a.inner(b) == pytest.approx(want, rel=1e-10, abs=1e-10 * ref.frob(D(a)) * ref.frob(D(b)))
    assert b.inner(a) == pytest.approx(want, rel=1e-10, abs=1e-10 * ref.frob(D(a)) * ref.frob(D(b)))
    assert a.norm() == pytest.approx(ref.frob(D(a)), rel=1e-12)


def test_inner_shape_mismatch():
    with pytest.raises(ValueError):
        fac(4, 2, 5).inner(fac(5, 2, 4))


def test_norm_clamped_for_zero_matrix():
    f = fac(5, 2, 6)
    z = f - f  # zero matrix, round-off may make ⟨z,z⟩ slightly negative
    assert z.norm() >= 0.0
    assert z.norm() < 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_inner(seed):
    ks = [3, 1, 0, 7, 12]
    terms = [fac(8, k, 6, seed=seed * 100 + i) if k else Factored.zeros(8, 6) for i, k in enumerate(ks)]
    G = pairwise_inner(terms)
    assert G.shape == (5, 5) and G.dtype == torch.float64
    dense = [D(t) for t in terms]
    want = torch.tensor([[float((x * y).sum()) for y in dense] for x in dense], dtype=torch.float64)
    assert torch.allclose(G, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))
    assert torch.allclose(G, G.T, rtol=0, atol=1e-10 * float(want.abs().max()))


def test_pairwise_inner_empty():
    G = pairwise_inner([])
    assert G.shape == (0, 0)


# -------------------------------------------------------------------- SVD
def check_svd(svd: SVD, M, dtype, rank=None):
    """svd is a valid thin SVD of M's top-``rank`` part."""
    t = tol(dtype) * 5
    k = svd.rank
    assert svd.U.shape == (M.shape[0], k) and svd.Vh.shape == (k, M.shape[1]) and svd.S.shape == (k,)
    assert svd.U.dtype == dtype and svd.Vh.dtype == dtype
    S_ref = ref.singular_values(M)
    scale = float(S_ref[0]) if S_ref.numel() else 1.0
    # singular values: sorted, matching the dense ones
    S = ref.d(svd.S)
    assert torch.all(S[:-1] >= S[1:])
    assert torch.allclose(S, S_ref[:k], rtol=0, atol=t * scale)
    # orthonormal columns/rows
    U, Vh = ref.d(svd.U), ref.d(svd.Vh)
    assert torch.allclose(U.T @ U, torch.eye(k, dtype=torch.float64), atol=t * 10)
    assert torch.allclose(Vh @ Vh.T, torch.eye(k, dtype=torch.float64), atol=t * 10)
    # the product is the top-k truncation
    rec = (U * S) @ Vh
    want = ref.top_r(M, k)
    assert ref.frob(rec - want) <= t * 10 * max(ref.frob(M), 1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,k,n", CASES)
def test_svd_full(m, k, n, dtype):
    f = fac(m, k, n, seed=7, dtype=dtype)
    svd = f.svd()
    assert svd.rank == min(m, n, k)
    check_svd(svd, D(f), dtype)
    assert ref.rel_err((ref.d(svd.U) * ref.d(svd.S)) @ ref.d(svd.Vh), D(f)) < tol(dtype) * 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,k,n", CASES)
@pytest.mark.parametrize("r", [1, 2, 4])
def test_svd_rank_truncation_matches_dense(m, k, n, dtype, r):
    f = fac(m, k, n, seed=11, dtype=dtype)
    svd = f.svd(rank=r)
    assert svd.rank == min(r, m, n, k)
    check_svd(svd, D(f), dtype)
    got = (ref.d(svd.U) * ref.d(svd.S)) @ ref.d(svd.Vh)
    assert ref.rel_err(got, ref.top_r(D(f), r)) < tol(dtype) * 10


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("m,n,true_rank,k", [(12, 10, 3, 6), (7, 9, 2, 15), (16, 16, 5, 20), (10, 4, 1, 3)])
def test_svd_rtol_rank_deficient(m, n, true_rank, k, dtype, rtol):
    f = deficient(m, n, true_rank, k, seed=5, dtype=dtype)
    assert ref.numerical_rank(D(f), rtol) == true_rank
    svd = f.svd(rtol=rtol)
    assert svd.rank == true_rank
    check_svd(svd, D(f), dtype)
    assert ref.rel_err(svd.factored().dense(torch.float64), D(f)) < tol(dtype) * 10
    # rank and rtol together: the smaller wins
    assert f.svd(rank=true_rank + 2, rtol=rtol).rank == true_rank
    assert f.svd(rank=1, rtol=rtol).rank == 1


def test_svd_drops_only_values_below_rtol():
    # M = diag(10, 1, 1e-3, 0) embedded with orthonormal factors
    Q1, _ = torch.linalg.qr(rnd(8, 4, seed=1, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(rnd(6, 4, seed=2, dtype=torch.float64))
    S = torch.tensor([10.0, 1.0, 1e-3, 0.0], dtype=torch.float64)
    f = Factored(Q1 * S, Q2.T)
    assert f.svd(rtol=1e-2).rank == 2  # 1e-3 ≤ 1e-2·10
    assert f.svd(rtol=1e-5).rank == 3
    assert torch.allclose(f.svd(rtol=1e-5).S, S[:3], atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_svd_zero_inner_dim_and_zero_matrix(dtype):
    z = Factored.zeros(6, 4, dtype=dtype)
    svd = z.svd()
    assert svd.rank == 0 and svd.U.shape == (6, 0) and svd.Vh.shape == (0, 4)
    assert svd.tail_energy(0) == 0.0
    assert torch.equal(svd.factored().dense(), torch.zeros(6, 4, dtype=dtype))
    zero_k = Factored(torch.zeros(6, 3, dtype=dtype), rnd(3, 4, dtype=dtype))
    assert zero_k.svd(rtol=1e-7).rank == 0
    assert torch.all(zero_k.svd().S == 0)


@pytest.mark.parametrize("m,k,n", CASES)
def test_svd_truncate_tail_tail_energy(m, k, n):
    f = fac(m, k, n, seed=21, dtype=torch.float64)
    M = D(f)
    svd = f.svd()
    S_ref = ref.singular_values(M)
    for r in range(0, svd.rank + 2):
        top, tail = svd.truncate(r), svd.tail(r)
        assert top.rank == min(r, svd.rank)
        assert top.rank + tail.rank == svd.rank
        top_d = top.factored().dense()
        tail_d = tail.factored().dense()
        want_top = ref.top_r(M, r)
        assert ref.frob(top_d - want_top) < 1e-10 * ref.frob(M)
        assert ref.frob(tail_d - (M - want_top)) < 1e-10 * ref.frob(M)
        assert svd.tail_energy(r) == pytest.approx(float((S_ref[r:] ** 2).sum()), rel=1e-10, abs=1e-12 * ref.frob(M) ** 2)
        assert svd.tail_energy(r) == pytest.approx(ref.frob(M - want_top) ** 2, rel=1e-9, abs=1e-12 * ref.frob(M) ** 2)
    assert svd.tail_energy(0) == pytest.approx(ref.frob(M) ** 2, rel=1e-12)


# --------------------------------------------------------------- compress
@pytest.mark.parametrize("m,n,true_rank,k", [(12, 10, 3, 6), (7, 9, 2, 15), (16, 16, 5, 20)])
def test_compress_float64_reaches_true_rank(m, n, true_rank, k):
    f = deficient(m, n, true_rank, k, seed=9, dtype=torch.float64)
    c = f.compress()
    assert c.inner_dim == true_rank
    assert ref.rel_err(D(c), D(f)) < 1e-12


@pytest.mark.parametrize("m,n,true_rank,k", [(12, 10, 3, 6), (7, 9, 2, 15), (16, 16, 5, 20)])
def test_compress_float32(m, n, true_rank, k):
    f = deficient(m, n, true_rank, k, seed=9)
    c = f.compress(rtol=1e-5)
    assert c.inner_dim == true_rank
    assert ref.rel_err(D(c), D(f)) < 1e-5
    c_default = f.compress()
    assert c_default.inner_dim <= min(m, n, k)
    assert ref.rel_err(D(c_default), D(f)) < 1e-5


def test_compress_full_rank_and_trivial():
    f = fac(9, 20, 7, seed=2)  # k > m, n: compresses to min(m, n)
    c = f.compress()
    assert c.inner_dim == 7
    assert ref.rel_err(D(c), D(f)) < 5e-6
    one = fac(5, 1, 4)
    assert one.compress() is one
    z = Factored.zeros(5, 4)
    assert z.compress() is z


# ------------------------------------------------------- SVD.plus (FedHL's basis update)
def orthonormal(m, a, seed):
    return torch.linalg.qr(rnd(m, a, seed=seed, dtype=torch.float64))[0]


def check_plus(U, w, Vh, update, rtol=1e-7, rank=None):
    base = SVD(U.float(), torch.ones(U.shape[1]), Vh.float())
    got = base.plus(w, update, rank=rank, rtol=rtol)
    want = (ref.d(U) * ref.d(w)) @ ref.d(Vh) + D(update)
    S_ref = ref.singular_values(want)
    k = got.rank
    assert torch.allclose(ref.d(got.S), S_ref[:k], rtol=0, atol=1e-5 * float(S_ref[0]))
    if rank is None:
        assert ref.rel_err(ref.d(got.U) * ref.d(got.S) @ ref.d(got.Vh), want) < 1e-5
        dropped = float(S_ref[k:].max()) if k < S_ref.numel() else 0.0  # only round-off-sized values are dropped
        assert dropped <= 1e-6 * float(S_ref[0])
    else:
        assert ref.rel_err(ref.d(got.U) * ref.d(got.S) @ ref.d(got.Vh), ref.top_r(want, rank)) < 1e-5
    eye = torch.eye(k, dtype=torch.float64)
    assert (ref.d(got.U).T @ ref.d(got.U) - eye).abs().max() < 1e-5
    assert (ref.d(got.Vh) @ ref.d(got.Vh).T - eye).abs().max() < 1e-5


@pytest.mark.parametrize("m,n,a,b", [(40, 30, 6, 5), (30, 50, 10, 12), (25, 25, 3, 1)])
def test_svd_plus_equals_the_dense_svd_of_the_sum(m, n, a, b):
    U, Vh = orthonormal(m, a, 1), orthonormal(n, a, 2).T
    w = torch.linspace(3.0, 0.5, a, dtype=torch.float64)
    check_plus(U, w, Vh, fac(m, b, n, seed=3))
    check_plus(U, w, Vh, fac(m, b, n, seed=4), rank=4)


def test_svd_plus_with_an_update_inside_the_basis_and_vanishing_weights():
    """FedHL's case: clients start from W_t's own directions, and weights 1 − Σp_i·1[j<r_i] are 0."""
    m, n, a = 36, 28, 8
    U, Vh = orthonormal(m, a, 5), orthonormal(n, a, 6).T
    w = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.4, 0.4, 0.1, 0.1], dtype=torch.float64)
    inside = Factored((U[:, :3] @ rnd(3, 4, seed=7, dtype=torch.float64)).float(), (rnd(4, 2, seed=8, dtype=torch.float64) @ Vh[:2]).float())
    mixed = Factored.stack([inside, fac(m, 3, n, seed=9)])
    check_plus(U, w, Vh, inside)
    check_plus(U, w, Vh, mixed)


def test_svd_plus_falls_back_when_the_basis_would_outgrow_the_matrix():
    m, n, a = 12, 10, 7
    U, Vh = orthonormal(m, a, 10), orthonormal(n, a, 11).T
    w = torch.linspace(2.0, 1.0, a, dtype=torch.float64)
    check_plus(U, w, Vh, fac(m, 5, n, seed=12))  # a + b = 12 > min(m, n) = 10
    empty = SVD(torch.zeros(m, 0), torch.zeros(0), torch.zeros(0, n))
    got = empty.plus(torch.zeros(0, dtype=torch.float64), fac(m, 3, n, seed=13), rtol=1e-7)
    assert ref.rel_err(ref.d(got.U) * ref.d(got.S) @ ref.d(got.Vh), D(fac(m, 3, n, seed=13))) < 1e-5


# ------------------------------------------------ top_svd (the top-r SVD from float64 Grams)
def near_collinear(m, n, K, r, eps, seed):
    """K clients' factors B0 + ε·noise, A0 + ε·noise stacked, as an exact method's M = Σ_i B_i·A_i."""
    B0, A0 = rnd(m, r, seed=seed), rnd(r, n, seed=seed + 1)
    Ls = [B0 + eps * rnd(m, r, seed=seed + 10 + i) for i in range(K)]
    Rs = [A0 + eps * rnd(r, n, seed=seed + 50 + i) for i in range(K)]
    return Factored(torch.cat(Ls, 1), torch.cat(Rs, 0))


@pytest.mark.parametrize(
    "f",
    [
        fac(40, 12, 30, seed=1),
        near_collinear(60, 45, 5, 4, 1e-3, seed=2),  # clients that barely moved: the Grams are ill-conditioned
        near_collinear(60, 45, 5, 4, 1e-5, seed=3),
        deficient(50, 40, 3, 10, seed=4),  # duplicate directions: singular Grams
        Factored(torch.cat([rnd(30, 4, seed=5)] * 3, 1), rnd(12, 25, seed=6)),  # identical columns
    ],
)
@pytest.mark.parametrize("r", [1, 4])
def test_top_svd_is_the_dense_top_r(f, r):
    M = D(f)
    got = f.top_svd(r)
    S_ref = ref.singular_values(M)
    k = got.rank
    assert k == min(r, int((S_ref > 1e-7 * S_ref[0]).sum()))
    assert torch.allclose(ref.d(got.S), S_ref[:k], rtol=0, atol=1e-5 * float(S_ref[0]))
    assert ref.rel_err((ref.d(got.U) * ref.d(got.S)) @ ref.d(got.Vh), ref.top_r(M, k)) < 1e-5
    eye = torch.eye(k, dtype=torch.float64)
    assert (ref.d(got.U).T @ ref.d(got.U) - eye).abs().max() < 1e-5
    assert (ref.d(got.Vh) @ ref.d(got.Vh).T - eye).abs().max() < 1e-5
    # the caller's Grams give the same result as the ones it computes
    G = (ref.d(f.L).T @ ref.d(f.L), ref.d(f.R) @ ref.d(f.R).T)
    assert torch.equal(f.top_svd(r, grams=G).S, got.S)


def test_top_svd_of_zero_is_empty():
    for f in (Factored.zeros(6, 5), Factored(torch.zeros(6, 3), rnd(3, 5, seed=0))):
        got = f.top_svd(2)
        assert got.rank == 0 and got.U.shape == (6, 0) and got.Vh.shape == (0, 5)
