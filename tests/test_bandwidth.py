"""``fed.residual_tol``: the base delta at the smallest rank within a relative error, against
hand-computed singular values and through a whole run."""

from __future__ import annotations

import math

import pytest
import torch
from engine_support import overrides, read_jsonl, tiny_models  # noqa: F401

from fedlora import cli
from fedlora.core import Factored, LoraSpec, get_aggregator
from fedlora.core.bandwidth import truncate_base_delta


def _state_with(delta: Factored):
    agg = get_aggregator("fedex")
    state = agg.init_state({"q": delta.shape}, 2, LoraSpec(alpha=4))
    return state.evolve(base_delta={"q": delta})


def _with_singular_values(sv, m=12, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(sv), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(sv), generator=g, dtype=torch.float64))
    return Factored((U * torch.tensor(sv, dtype=torch.float64)).float(), V.T.float()), (U * torch.tensor(sv, dtype=torch.float64)) @ V.T


@pytest.mark.parametrize(
    "tol,k",
    [(0.05, 3), (0.01, 4), (0.3, 2), (0.6, 1)],  # σ = 3, 2, 1, 0.1: Σσ² = 14.01; keep k with Σ_{j≥k}σ_j² ≤ τ²·14.01
)
def test_the_smallest_rank_within_the_tolerance(tol, k):
    sv = [3.0, 2.0, 1.0, 0.1]
    delta, dense = _with_singular_values(sv)
    new = truncate_base_delta(_state_with(delta), tol)
    got = new.base_delta["q"]
    assert got.inner_dim == k and new.info["residual_rank"] == k
    err = float(torch.linalg.norm(got.dense(torch.float64) - dense) / torch.linalg.norm(dense))
    assert err == pytest.approx(math.sqrt(sum(s * s for s in sv[k:]) / 14.01), rel=1e-4, abs=1e-6)
    assert err <= tol and new.info["residual_dropped"] == pytest.approx(err, rel=1e-4, abs=1e-6)


def test_zero_tolerance_changes_nothing():
    delta, _ = _with_singular_values([3.0, 2.0, 1.0, 0.1])
    state = _state_with(delta)
    assert truncate_base_delta(state, 0.0) is state


def test_a_run_with_a_tolerance_sends_fewer_bytes(tiny_models, tmp_path):
    rows = {}
    for tol in (0.0, 0.5):
        out = tmp_path / f"tol{tol}"
        assert cli.main(["run", *overrides(tiny_models["bert"], out, fed__method="fedex", fed__residual_tol=tol, train__lr=5e-3)]) == 0
        (run,) = [p for p in out.iterdir() if p.is_dir()]
        rows[tol] = read_jsonl(run / "metrics.jsonl")
    assert rows[0.5][-1]["bytes_down"] < rows[0.0][-1]["bytes_down"]
    assert all(0 < r["residual_dropped"] <= 0.5 for r in rows[0.5]) and "residual_dropped" not in rows[0.0][0]
