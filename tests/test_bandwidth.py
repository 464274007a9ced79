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


# --------------------------------------------------------------------------- fed.transport
def _is_bf16(t: torch.Tensor) -> bool:
    return torch.equal(t, t.to(torch.bfloat16).to(t.dtype))


@pytest.mark.parametrize("method", ["fedex", "hexa", "fedit", "ffa"])
def test_bf16_transport_keeps_the_aggregate_within_bf16_rounding_of_what_was_sent(method):
    """Round-trip through bf16 on both legs: the updates the server aggregates are the rounded
    ones, and the new state (what it sends, what it keeps) is bf16 too. Exact methods stay
    exact up to the rounding of the new factors: ‖ΔW_global − Σ p_i ΔW_i‖ ≤ a few 2⁻⁸ relative,
    against a dense float64 reference over the rounded updates."""
    from helpers import client_effective_delta, client_round, global_after, make

    from fedlora.core.bandwidth import transport_start, transport_state, transport_update

    bf16 = torch.bfloat16
    agg, state = make(method)
    state = transport_state(state, bf16)
    ns = [30, 50, 20]
    starts, updates = client_round(agg, state, [None] * 3, ns, seed=4)
    starts = [transport_start(s, bf16) for s in starts]
    sent = [transport_update(u, bf16) for u in updates]
    assert not all(_is_bf16(a.B) for u in updates for a in u.adapters.values()), "the clients' own values are not bf16: rounding has work to do"
    exact = agg.aggregate(state, sent)
    new = transport_state(exact, bf16)
    for a in new.adapters.values():
        assert _is_bf16(a.B) and _is_bf16(a.A)
    worst = 0.0  # the rounding's relative change of each module's round result, dense float64
    for name in state.adapters:
        before, after = global_after(agg, exact, name), global_after(agg, new, name)
        worst = max(worst, float(torch.linalg.norm(after - before) / torch.linalg.norm(before)))
    assert new.info["transport_error"] == pytest.approx(worst, rel=1e-3) and 0 < worst < 2**-7
    for d in new.base_delta.values():
        assert _is_bf16(d.L) and _is_bf16(d.R)
    p = torch.tensor(exact.info.get("hexa_weights", exact.info.get("weights", [n / sum(ns) for n in ns])), dtype=torch.float64)  # HEXA: drift weights
    for name in state.adapters:
        want = sum(w * client_effective_delta(s, u, name) for w, s, u in zip(p, starts, sent))
        if method == "fedit":  # FedIT's aggregate is not the mean of products: compare with its own, unrounded
            want = global_after(agg, exact, name)
        got = global_after(agg, new, name)
        rel = float(torch.linalg.norm(got - want) / torch.linalg.norm(want))
        assert rel < 2**-6, (name, rel)
    assert transport_state(new, torch.float32) is new  # float32 transport is the identity


def test_a_bf16_run_sends_half_the_bytes_and_its_server_keeps_what_it_sends(tiny_models, tmp_path):
    from fedlora.engine.checkpoint import load_checkpoint

    rows, ckpt = {}, {}
    for transport in ("float32", "bfloat16"):
        out = tmp_path / transport
        assert cli.main(["run", *overrides(tiny_models["bert"], out, fed__method="fedex", fed__transport=transport, train__lr=5e-3)]) == 0
        (run,) = [p for p in out.iterdir() if p.is_dir()]
        rows[transport], ckpt[transport] = read_jsonl(run / "clients.jsonl"), load_checkpoint(run / "checkpoint.pt")
    for full, half in zip(rows["float32"], rows["bfloat16"], strict=True):
        assert half["bytes_up"] * 2 == full["bytes_up"] and half["bytes_down"] * 2 == full["bytes_down"]
    state = ckpt["bfloat16"]["state"]
    assert all(_is_bf16(a[f]) for a in state["adapters"].values() for f in ("B", "A"))
    assert all(_is_bf16(t) for t in state["dense"].values())
    assert not all(_is_bf16(a[f]) for a in ckpt["float32"]["state"]["adapters"].values() for f in ("B", "A"))
