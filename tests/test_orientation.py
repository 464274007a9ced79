"""fold_delta orientation: nn.Linear (out×in) and GPT-2 Conv1D (in×out), square and not, bf16.

The decisive case is a NON-SYMMETRIC SQUARE layer: folding FedEx's residual with
the wrong orientation raises nothing there, it only changes the layer's output.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from helpers import run_round
from torch import nn

from fedlora.core import Factored, LoraSpec, fold_delta, get_aggregator


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight stored in×out, y = x·W + b."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


def lora_out(x, a):
    """The LoRA branch s·x·Aᵀ·Bᵀ of a peft layer."""
    return a.scale * (x @ a.A.T) @ a.B.T


def fac(m, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    return Factored(torch.randn(m, k, generator=g), torch.randn(k, n, generator=g))


# ------------------------------------------------------------- fold itself
@pytest.mark.parametrize("m,n", [(16, 16), (12, 10), (9, 24)])
@pytest.mark.parametrize("k", [0, 1, 5, 30])
def test_fold_linear_and_conv1d_layouts(m, n, k):
    f = fac(m, k, n, seed=m * n + k) if k else Factored.zeros(m, n)
    W = torch.randn(m, n, dtype=torch.float64).float()
    want = ref.d(W) + ref.mat(f.L, f.R)
    w = W.clone()
    out = fold_delta(w, f)
    assert out is w  # in place
    assert ref.rel_err(w, want) < 1e-6
    Wc = W.T.contiguous().clone()  # Conv1D: in×out
    fold_delta(Wc, f, fan_in_fan_out=True)
    assert ref.rel_err(Wc, want.T) < 1e-6


def test_fold_float64_weight():
    f = fac(7, 3, 5, seed=1)
    W = torch.randn(7, 5, dtype=torch.float64)
    want = W.clone() + ref.mat(f.L, f.R)
    fold_delta(W, f)
    assert ref.rel_err(W, want) < 1e-12


@pytest.mark.parametrize("m,n", [(12, 10), (10, 12)])
def test_fold_refuses_wrong_layout(m, n):
    f = fac(m, 2, n, seed=0)
    with pytest.raises(ValueError):
        fold_delta(torch.zeros(n, m), f)  # out×in expected
    with pytest.raises(ValueError):
        fold_delta(torch.zeros(m, n), f, fan_in_fan_out=True)  # in×out expected
    with pytest.raises(ValueError):
        fold_delta(torch.zeros(m, n + 1), f)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_fold_bf16_weight(fan_in_fan_out):
    m, n = 16, 12
    f = fac(m, 4, n, seed=3)
    W = torch.randn(m, n).to(torch.bfloat16)
    w = (W.T.contiguous() if fan_in_fan_out else W).clone()
    ptr = w.data_ptr()
    fold_delta(w, f, fan_in_fan_out=fan_in_fan_out)
    assert w.dtype == torch.bfloat16 and w.data_ptr() == ptr
    got = ref.d(w.T if fan_in_fan_out else w)
    exact = ref.d(W) + ref.mat(f.L, f.R)
    # one rounding to bf16 at the end: within one bf16 ulp (2^-7 relative) of the exact sum, elementwise
    assert torch.all((got - exact).abs() <= 2.0**-7 * exact.abs() + 1e-30)
    # and equal to rounding the exact sum, except for rare ties at float32 accumulation
    rounded = exact.to(torch.bfloat16).double()
    assert (got != rounded).float().mean() < 0.02
    assert not torch.equal(got, ref.d(W))


# -------------------------------------------------- FedEx residual in a layer
def fedex_round(m, n, seed, rank=4):
    agg = get_aggregator("fedex", weighting="uniform")
    state = agg.init_state({"attn": (m, n)}, rank, LoraSpec(alpha=16.0))
    state = run_round(agg, state, [None] * 3, [5, 7, 9], seed=seed).new  # non-zero global adapter
    rnd = run_round(agg, state, [None] * 3, [5, 7, 9], seed=seed + 1)
    ideal = ref.weighted_sum([ref.product(u.adapters["attn"].B, u.adapters["attn"].A, u.adapters["attn"].scale) for u in rnd.updates], [1 / 3] * 3)
    return rnd, ideal


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedex_residual_into_square_linear_matches_dense_model(seed):
    n = 16
    rnd, ideal = fedex_round(n, n, seed)
    res = rnd.new.base_delta["attn"]
    R = ref.mat(res.L, res.R)
    assert ref.frob(R - R.T) > 0.1 * ref.frob(R)  # non-symmetric: a transpose would matter

    torch.manual_seed(seed)
    lin = nn.Linear(n, n)
    W0, b = ref.d(lin.weight), ref.d(lin.bias)
    fold_delta(lin.weight.data, res)
    x = torch.randn(32, n)
    a = rnd.new.adapters["attn"]
    with torch.no_grad():
        y = ref.d(lin(x) + lora_out(x, a))
    want = ref.d(x) @ (W0 + ideal).T + b
    assert ref.rel_err(y, want) < 1e-5

    # the public FedEx-LoRA bug (transposed residual on nn.Linear) is caught by this very check
    torch.manual_seed(seed)
    wrong = nn.Linear(n, n)
    wrong.weight.data += res.t().dense()
    with torch.no_grad():
        y_bad = ref.d(wrong(x) + lora_out(x, a))
    assert ref.rel_err(y_bad, want) > 1e-2


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("m,n", [(16, 16), (12, 20)])
def test_fedex_residual_into_conv1d_matches_dense_model(seed, m, n):
    rnd, ideal = fedex_round(m, n, seed)  # delta is out×in = m×n
    res = rnd.new.base_delta["attn"]
    torch.manual_seed(seed)
    conv = Conv1D(nf=m, nx=n)
    W0, b = ref.d(conv.weight), ref.d(conv.bias)  # W0 is in×out
    fold_delta(conv.weight.data, res, fan_in_fan_out=True)
    x = torch.randn(4, 8, n)
    a = rnd.new.adapters["attn"]
    with torch.no_grad():
        y = ref.d(conv(x) + lora_out(x, a))
    want = ref.d(x) @ (W0 + ideal.T) + b
    assert ref.rel_err(y, want) < 1e-5
    if m == n:  # folding it out×in into the square Conv1D weight is silently wrong
        torch.manual_seed(seed)
        bad = Conv1D(nf=m, nx=n)
        fold_delta(bad.weight.data, res)
        with torch.no_grad():
            assert ref.rel_err(ref.d(bad(x) + lora_out(x, a)), want) > 1e-2


def test_fedex_residual_into_bf16_linear():
    n = 16
    rnd, ideal = fedex_round(n, n, seed=5)
    torch.manual_seed(5)
    lin = nn.Linear(n, n).to(torch.bfloat16)
    W0 = ref.d(lin.weight)
    fold_delta(lin.weight.data, rnd.new.base_delta["attn"])
    a = rnd.new.adapters["attn"]
    W_eff = ref.d(lin.weight) + ref.product(a.B, a.A, a.scale)
    # bf16 storage: the folded model is the dense reference up to bf16 rounding of the weight
    err = (W_eff - (W0 + ideal)).abs()
    assert torch.all(err <= 2.0**-7 * ref.d(lin.weight).abs() + 1e-6)
