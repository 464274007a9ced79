"""Factored.truncated_svd (FRA's fast path) against Factored.svd and dense float64 maths."""

from __future__ import annotations

import pytest
import reference as ref
import torch

from fedlora.core.factored import Factored

CASES = [(12, 3, 10), (5, 12, 7), (9, 11, 4), (6, 20, 6), (16, 4, 16), (8, 1, 13), (40, 30, 300)]


def fac(m, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Factored(torch.randn(m, k, generator=g, dtype=torch.float64).to(dtype), torch.randn(k, n, generator=g, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-11)])
@pytest.mark.parametrize("m,k,n", CASES)
@pytest.mark.parametrize("r", [1, 4, 50])
def test_truncated_svd_matches_svd_and_dense(m, k, n, dtype, tol, r):
    f = fac(m, k, n, dtype, seed=m + k + n)
    top, tail = f.truncated_svd(r)
    full = f.svd()
    assert top.rank == min(r, m, n, k) and top.U.dtype == dtype and top.Vh.is_contiguous()
    # the same QR route: the same singular values up to the core product's rounding
    torch.testing.assert_close(top.S, full.S[: top.rank], rtol=1e-13, atol=1e-13 * float(full.S[0]))
    assert tail == pytest.approx(full.tail_energy(r), rel=1e-12, abs=1e-12 * float(full.S[0]) ** 2)
    eye = torch.eye(top.rank, dtype=torch.float64)
    assert ref.frob(ref.d(top.U).T @ ref.d(top.U) - eye) < tol * 10
    assert ref.frob(ref.d(top.Vh) @ ref.d(top.Vh).T - eye) < tol * 10
    M = ref.mat(f.L, f.R)
    got = (ref.d(top.U) * ref.d(top.S)) @ ref.d(top.Vh)
    assert ref.rel_err(got, ref.top_r(M, r)) < tol * 10


def test_truncated_svd_zero_inner_dim_and_zero_matrix():
    top, tail = Factored.zeros(5, 7).truncated_svd(3)
    assert top.rank == 0 and tail == 0.0
    top, tail = Factored(torch.zeros(5, 2), torch.zeros(2, 7)).truncated_svd(3)
    assert torch.equal(top.S, torch.zeros(2)) and tail == 0.0


def test_truncated_svd_drops_values_below_rtol_into_the_tail():
    """A rank-2 product of inner dimension 4: with rtol the round-off values past σ₂ are not kept, and
    their (≈ 0) energy is the tail; without it all four come back."""
    g = torch.Generator().manual_seed(3)
    L = torch.randn(10, 4, generator=g, dtype=torch.float64)
    L[:, 2:] = L[:, :2] @ torch.randn(2, 2, generator=g, dtype=torch.float64)  # rank 2
    f = Factored(L, torch.randn(4, 9, generator=g, dtype=torch.float64))
    top, tail = f.truncated_svd(4, rtol=1e-7)
    assert top.rank == 2 and tail < 1e-20 * float(top.S[0]) ** 2
    assert f.truncated_svd(4)[0].rank == 4
    assert ref.rel_err((ref.d(top.U) * ref.d(top.S)) @ ref.d(top.Vh), ref.mat(f.L, f.R)) < 1e-12
    assert Factored(torch.zeros(6, 3), torch.zeros(3, 5)).truncated_svd(2, rtol=1e-7)[0].rank == 0
