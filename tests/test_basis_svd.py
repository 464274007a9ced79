"""BasisSVD (FedHL's global update as orthonormal bases and rotations) against dense float64 SVDs."""

from __future__ import annotations

import reference as ref
import torch

from fedlora.core import BasisSVD, Factored
from fedlora.core.serialize import _decode, _encode


def rnd(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def fac(m, k, n, seed):
    return Factored(rnd(m, k, seed=seed), rnd(k, n, seed=seed + 1000))


def dense(x) -> torch.Tensor:
    s = x.svd() if isinstance(x, BasisSVD) else x
    return (ref.d(s.U) * ref.d(s.S)) @ ref.d(s.Vh)


def check(got: BasisSVD, want: torch.Tensor, rank: int | None = None):
    """got is a thin SVD of want (or of its top-``rank`` part): values, orthonormal vectors, product."""
    S_ref = ref.singular_values(want)
    k = got.rank
    assert torch.allclose(ref.d(got.S), S_ref[:k], rtol=0, atol=1e-5 * float(S_ref[0]))
    target = want if rank is None else ref.top_r(want, rank)
    assert ref.rel_err(dense(got), target) < 1e-5
    s, eye = got.svd(), torch.eye(k, dtype=torch.float64)
    assert (ref.d(s.U).T @ ref.d(s.U) - eye).abs().max() < 1e-5
    assert (ref.d(s.Vh) @ ref.d(s.Vh).T - eye).abs().max() < 1e-5
    for r in (1, k // 2, k):  # truncate multiplies out only the top columns, and they are the SVD's
        t = got.truncate(r)
        assert ref.rel_err((ref.d(t.U) * ref.d(t.S)) @ ref.d(t.Vh), ref.top_r(want, r)) < 1e-4


def test_rounds_of_plus_match_the_dense_sum_and_the_plain_svd():
    """Four rounds of U·diag(w)·Vᵀ + L·R (w replaces Σ, as FedHL's kept weights do): the basis grows
    in place, each result is the dense SVD of the sum, and SVD.plus (vectors multiplied out) agrees."""
    m, n = 60, 48
    first = fac(m, 5, n, seed=0).svd(rtol=1e-7)
    g, plain = BasisSVD.of(first), first
    for t in range(4):
        w = torch.linspace(1.0, 0.3, g.rank, dtype=torch.float64)
        up = fac(m, 4, n, seed=10 + t)
        want = (ref.d(plain.U) * w) @ ref.d(plain.Vh) + ref.d(up.L) @ ref.d(up.R)
        g, plain = g.plus(w, up, rtol=1e-7), plain.plus(w, up, rtol=1e-7)
        check(g, want)
        assert ref.rel_err(dense(g), dense(plain)) < 1e-5
    assert g.Q.shape[1] == g.rank  # no truncation: the basis is exactly U's span
    assert g.buffers[0] is not None and g.buffers[0].data.shape[1] > g.Q.shape[1]  # grown in place, room to spare


def test_running_sum_against_float64():
    m, n = 50, 40
    acc = torch.zeros(m, n, dtype=torch.float64)
    g = BasisSVD.of(Factored.zeros(m, n).svd())
    for t in range(4):
        w = 0.5 * g.S.double()  # W ← W/2 + L·R
        up = fac(m, 3, n, seed=20 + t)
        acc = 0.5 * acc + ref.d(up.L) @ ref.d(up.R)
        g = g.plus(w, up, rtol=1e-7)
        check(g, acc)


def test_a_second_plus_on_the_same_svd_leaves_the_first_result_alone():
    """The buffer's spare columns belong to whichever plus claims them first."""
    m, n = 40, 36
    g0 = BasisSVD.of(fac(m, 4, n, seed=1).svd()).plus(torch.ones(4, dtype=torch.float64), fac(m, 3, n, seed=2))
    base = dense(g0)
    w = g0.S.double()  # W + L·R
    u1, u2 = fac(m, 2, n, seed=3), fac(m, 2, n, seed=4)
    a = g0.plus(w, u1)
    snap_a = dense(a)
    b = g0.plus(w, u2)  # must not write over a's new columns
    assert a.Q.data_ptr() == g0.Q.data_ptr() and b.Q.data_ptr() != g0.Q.data_ptr()
    assert torch.equal(dense(a), snap_a)
    assert ref.rel_err(dense(a), base + ref.d(u1.L) @ ref.d(u1.R)) < 1e-5
    assert ref.rel_err(dense(b), base + ref.d(u2.L) @ ref.d(u2.R)) < 1e-5
    assert ref.rel_err(dense(g0), base) < 1e-12  # and the old one is what it was


def test_truncation_compacts_the_basis():
    m, n = 50, 44
    g = BasisSVD.of(fac(m, 6, n, seed=5).svd())
    for t in range(3):
        g = g.plus(torch.ones(g.rank, dtype=torch.float64), fac(m, 5, n, seed=30 + t), rank=6)
        assert g.rank == 6 and g.Q.shape[1] <= g.rank + 5


def test_in_basis_and_fallback_match_svd_plus():
    m, n, a = 14, 12, 6
    s = fac(m, a, n, seed=7).svd()
    g = BasisSVD.of(s)
    w = torch.linspace(1.0, 0.0, a, dtype=torch.float64)
    P, E = rnd(a, 3, seed=8).double(), rnd(a, 3, seed=9).double()
    up = fac(m, 3, n, seed=10)
    want = dense(s.plus(w, up, in_basis=(P, E)))
    check(g.plus(w, up, in_basis=(P, E)), want)
    big = fac(m, 8, n, seed=11)  # a + b = 14 > min(m, n): the stacked fallback
    check(g.plus(w, big), dense(s.plus(w, big)))


def test_serialised_without_the_spare_columns():
    m, n = 30, 26
    g = BasisSVD.of(fac(m, 4, n, seed=12).svd()).plus(torch.ones(4, dtype=torch.float64), fac(m, 3, n, seed=13))
    enc = _encode({"g": g})["g"]
    assert enc["Q"].is_contiguous() and enc["Q"].numel() == g.Q.numel() and enc["Q"].untyped_storage().nbytes() == g.Q.numel() * 4
    assert g.buffers[0].data.shape[0] > g.Q.shape[1]  # while the live basis has spare rows
    back = _decode({"g": enc})["g"]
    assert isinstance(back, BasisSVD) and torch.equal(dense(back), dense(g))
    # a resumed run continues bit for bit: the restored bases keep their buffers' strides
    w, up = g.S.double(), fac(m, 2, n, seed=14)
    assert torch.equal(dense(back.plus(w, up)), dense(g.plus(w, up)))


def test_resume_right_after_the_first_round_is_bit_for_bit():
    """A basis without a buffer (as the first round leaves it) comes back with the same layout."""
    m, n = 30, 26
    g = BasisSVD.of(fac(m, 4, n, seed=15).svd())
    back = _decode({"g": _encode({"g": g})["g"]})["g"]
    w, up = g.S.double(), fac(m, 3, n, seed=16)
    assert torch.equal(dense(back.plus(w, up)), dense(g.plus(w, up)))
