"""Client-level differential privacy: the accountant's values (Opacus 1.6.0, wave2.md §3),
the mechanism against independent float64 references, the checks before training, and runs
through both engines.

References are computed here from the definitions, never read from fedlora's own outputs:
a client's update is s·B_i·A_i − s·B·A formed densely (or the raw factor differences), its
clip factor min(1, C/‖δ_i‖), the mean over a fixed denominator D.
"""

from __future__ import annotations

import math

import pytest
import torch
from engine_support import overrides, read_jsonl, tiny_models  # noqa: F401

from fedlora import cli
from fedlora.config import ConfigError, load_config
from fedlora.core import Adapter, ClientUpdate, LoraSpec, get_aggregator
from fedlora.core.errors import AggregationError, UpdateError
from fedlora.core.privacy import ClientDP, private_aggregate, update_norm
from fedlora.engine import build_experiment
from fedlora.privacy import epsilon, noise_for_epsilon

# ------------------------------------------------------------------ accountant


@pytest.mark.parametrize(
    "q,z,T,rdp,prv", [(0.1, 1.0, 100, 7.899, 7.057), (0.1, 1.0, 1000, 27.163, 25.216), (0.3, 1.0, 50, 16.737, 15.220), (1.0, 5.0, 50, 7.077, 6.583)]
)
def test_accountant_values(q, z, T, rdp, prv):
    assert epsilon("rdp", z, q, T, 1e-5) == pytest.approx(rdp, abs=1e-3)
    assert epsilon("prv", z, q, T, 1e-5) == pytest.approx(prv, abs=2e-3)


@pytest.mark.parametrize("accountant,expected", [("prv", (1.1523, 0.744, 0.5939)), ("rdp", (1.2598, 0.7983, 0.6299))])
def test_noise_for_a_target_epsilon(accountant, expected):
    """q = 0.01, 500 steps, ε = 1 / 3 / 6; Opacus' search stops within 0.01 of the target ε."""
    for eps, z in zip((1, 3, 6), expected):
        got = noise_for_epsilon(accountant, eps, 1e-5, 0.01, 500)
        assert got == pytest.approx(z, rel=0.01)
        assert epsilon(accountant, got, 0.01, 500, 1e-5) <= eps + 1e-9


# ------------------------------------------------------------------- mechanism
SHAPES = {"q": (12, 10), "v": (8, 10)}
RANK, SCALE = 2, 2.0


def _state(seed=0, dense=True):
    agg = get_aggregator("fedit", weighting="uniform")
    state = agg.init_state(SHAPES, RANK, LoraSpec(alpha=RANK * SCALE), dense={"head.weight": torch.zeros(3, 4)} if dense else None, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    adapters = {n: Adapter(torch.randn(m, RANK, generator=g), torch.randn(RANK, k, generator=g), SCALE) for n, (m, k) in SHAPES.items()}
    return state.evolve(adapters=adapters)


def _updates(state, n=4, size=(0.3, 0.3, 3.0, 0.05), frozen_A=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ad = {}
        for name, a in state.adapters.items():
            A = a.A if frozen_A else a.A + size[i] * torch.randn(a.A.shape, generator=g)
            ad[name] = Adapter(a.B + size[i] * torch.randn(a.B.shape, generator=g), A, a.scale)
        dense = {k: v + size[i] * torch.randn(v.shape, generator=g) for k, v in state.dense.items()}
        out.append(ClientUpdate(f"c{i}", 10 + i, ad, dense))
    return out


def _dense_increment(state, u):
    return {
        n: (u.adapters[n].scale * u.adapters[n].B.double() @ u.adapters[n].A.double() - a.scale * a.B.double() @ a.A.double())
        for n, a in state.adapters.items()
    }


def _ref_norm(state, u, space):
    sq = sum(float((u.dense[k].double() - v.double()).square().sum()) for k, v in state.dense.items())
    for n, a in state.adapters.items():
        if space in ("dense", "dense_exact"):
            sq += float(_dense_increment(state, u)[n].square().sum())
        else:
            sq += float((u.adapters[n].B.double() - a.B.double()).square().sum())
            if space == "factors":
                sq += float((u.adapters[n].A.double() - a.A.double()).square().sum())
    return math.sqrt(sq)


@pytest.mark.parametrize("space", ["factors", "B", "dense"])
def test_update_norm_matches_the_dense_definition(space):
    state = _state()
    for u in _updates(state, frozen_A=space == "B"):
        assert update_norm(space, state, u) == pytest.approx(_ref_norm(state, u, space), rel=1e-9)


def _noiseless(C, D):
    return ClientDP(clip=C, noise_multiplier=0.0, denominator=D)


def test_fedit_without_noise_is_the_clipped_mean_of_factor_differences():
    state, C, D = _state(), 1.0, 5.0  # D above the number of reporting clients: a fixed denominator
    updates = _updates(state)
    new = private_aggregate(get_aggregator("fedit", weighting="uniform"), state, updates, _noiseless(C, D), torch.Generator().manual_seed(0))
    gam = [min(1.0, C / _ref_norm(state, u, "factors")) for u in updates]
    assert gam[2] < 0.5 and gam[3] == 1.0, "the check has power: one client is clipped hard, one not at all"
    for n, a in state.adapters.items():
        B = a.B.double() + sum(gm * (u.adapters[n].B.double() - a.B.double()) for gm, u in zip(gam, updates)) / D
        A = a.A.double() + sum(gm * (u.adapters[n].A.double() - a.A.double()) for gm, u in zip(gam, updates)) / D
        torch.testing.assert_close(new.adapters[n].B.double(), B, atol=1e-6, rtol=0)
        torch.testing.assert_close(new.adapters[n].A.double(), A, atol=1e-6, rtol=0)
    head = sum(gm * u.dense["head.weight"].double() for gm, u in zip(gam, updates)) / D
    torch.testing.assert_close(new.dense["head.weight"].double(), head, atol=1e-6, rtol=0)
    assert new.info["dp_clipped_fraction"] == pytest.approx(sum(_ref_norm(state, u, "factors") > C for u in updates) / 4)


@pytest.mark.parametrize("method", ["fedex", "fra"])
def test_product_space_methods_without_noise(method):
    """fedex: W0 + base delta + s·B'·A' equals G + Σγ_iΔ_i/D exactly; fra: its best rank-r approximation."""
    state, C, D = _state(), 2.0, 4.0
    updates = _updates(state)
    agg = get_aggregator(method, weighting="uniform")
    new = private_aggregate(agg, state, updates, _noiseless(C, D), torch.Generator().manual_seed(0))
    gam = [min(1.0, C / _ref_norm(state, u, "dense")) for u in updates]
    for n, a in state.adapters.items():
        incs = [_dense_increment(state, u)[n] for u in updates]
        want = a.scale * a.B.double() @ a.A.double() + sum(gm * d for gm, d in zip(gam, incs)) / D
        got = new.adapters[n].delta().dense(torch.float64)
        if method == "fedex":
            got = got + new.base_delta[n].dense(torch.float64)
        else:
            U, S, Vh = torch.linalg.svd(want)
            want = U[:, :RANK] * S[:RANK] @ Vh[:RANK]
            assert not new.base_delta
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_noise_has_the_stated_standard_deviation():
    """No client sampled: the release is N(0, z²C²)/D alone; its empirical sd over the
    (12+8)·10 + 3·4 product entries and the head matches z·C/D within sampling error."""
    state, C, z, D = _state(dense=False), 0.5, 3.0, 2.0
    state = state.evolve(adapters={n: Adapter(torch.zeros(m, RANK), torch.zeros(RANK, k), SCALE) for n, (m, k) in SHAPES.items()})
    new = private_aggregate(get_aggregator("fedex", weighting="uniform"), state, [], ClientDP(C, z, D), torch.Generator().manual_seed(7))
    entries = torch.cat([(new.adapters[n].delta().dense(torch.float64) + new.base_delta[n].dense(torch.float64)).flatten() for n in SHAPES])
    assert entries.numel() == 200
    assert float(entries.std()) == pytest.approx(z * C / D, rel=0.15)
    assert abs(float(entries.mean())) < 3 * z * C / D / math.sqrt(200)


def test_ffa_noise_stays_on_B_and_a_changed_A_is_refused():
    state = _state()
    agg = get_aggregator("ffa", weighting="uniform")
    new = private_aggregate(agg, state, _updates(state, frozen_A=True), ClientDP(1.0, 1.0, 4.0), torch.Generator().manual_seed(0))
    for n, a in state.adapters.items():
        assert torch.equal(new.adapters[n].A, a.A)
        assert not torch.equal(new.adapters[n].B, a.B)
    with pytest.raises(UpdateError, match="'c0'.*A was changed"):
        private_aggregate(agg, state, _updates(state), ClientDP(1.0, 1.0, 4.0), torch.Generator().manual_seed(0))


def test_fedsb_first_round_is_fedex_like_then_noise_stays_on_its_r_by_r_core():
    """Round 1 under DP: the noised mean of the products, exactly (adapters + base delta), and the
    frame U fixed from it. Later rounds: without noise, B' = B + Σγ_i·U·Uᵀ(B_i − B)/D (reference);
    with noise alone, B' − B = U·ξ_R lies in span(U), A never moves."""
    agg = get_aggregator("fedsb", weighting="uniform")
    state = agg.init_state(SHAPES, RANK, LoraSpec(alpha=RANK * SCALE), seed=0)
    first = private_aggregate(agg, state, _updates(state), ClientDP(1.0, 0.5, 4.0), torch.Generator().manual_seed(0))
    assert first.base_delta and set(first.extra["frame"]) == set(SHAPES)
    for n, U in first.extra["frame"].items():
        torch.testing.assert_close(U.double().T @ U.double(), torch.eye(RANK, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(U.double() @ (U.double().T @ first.adapters[n].B.double()), first.adapters[n].B.double(), atol=1e-5, rtol=0)
    C, D = 0.5, 4.0
    g = torch.Generator().manual_seed(3)
    updates = []
    for i, size in enumerate((0.3, 3.0, 0.05)):
        ad = {}
        for n, a in first.adapters.items():
            U = first.extra["frame"][n]
            ad[n] = Adapter(a.B + size * (U @ torch.randn(RANK, RANK, generator=g)) + 1e-4 * torch.randn(a.B.shape, generator=g), a.A, a.scale)
        updates.append(ClientUpdate(f"c{i}", 10, ad))
    new = private_aggregate(agg, first, updates, _noiseless(C, D), torch.Generator().manual_seed(0))
    proj = {n: U.double() @ U.double().T for n, U in first.extra["frame"].items()}
    norms = [math.sqrt(sum(float((proj[n] @ (u.adapters[n].B.double() - a.B.double())).square().sum()) for n, a in first.adapters.items())) for u in updates]
    gam = [min(1.0, C / x) for x in norms]
    assert gam[1] < 0.5 and gam[2] == 1.0
    for n, a in first.adapters.items():
        want = a.B.double() + sum(gm * (proj[n] @ (u.adapters[n].B.double() - a.B.double())) for gm, u in zip(gam, updates)) / D
        torch.testing.assert_close(new.adapters[n].B.double(), want, atol=1e-6, rtol=0)
        assert torch.equal(new.adapters[n].A, a.A)
    noisy = private_aggregate(agg, first, [], ClientDP(C, 2.0, D), torch.Generator().manual_seed(1))
    for n, a in first.adapters.items():
        step = noisy.adapters[n].B.double() - a.B.double()
        assert float(step.norm()) > 0.1 * 2.0 * C / D
        torch.testing.assert_close(proj[n] @ step, step, atol=1e-5, rtol=0)


def test_fedsvd_refactors_the_noised_B_mean_instead_of_keeping_A():
    """FedSVD under DP: FFA-LoRA's clipped mean of B (reference: B + Σγ_i(B_i − B)/D, A shared),
    then its SVD step on s·B̃·A as post-processing: the product is kept and A' has orthonormal
    rows that follow it (before, A stayed at its random start: FFA-LoRA under another name)."""
    state, C, D = _state(), 1.0, 5.0
    updates = _updates(state, frozen_A=True)
    new = private_aggregate(get_aggregator("fedsvd", weighting="uniform"), state, updates, _noiseless(C, D), torch.Generator().manual_seed(0))
    gam = [min(1.0, C / _ref_norm(state, u, "B")) for u in updates]
    assert min(gam) < 0.5, "the check has power: a client is clipped"
    for n, a in state.adapters.items():
        B = a.B.double() + sum(gm * (u.adapters[n].B.double() - a.B.double()) for gm, u in zip(gam, updates)) / D
        torch.testing.assert_close(new.adapters[n].delta().dense(torch.float64), a.scale * B @ a.A.double(), atol=1e-5, rtol=0)
        A = new.adapters[n].A.double()
        torch.testing.assert_close(A @ A.T, torch.eye(RANK, dtype=torch.float64), atol=1e-5, rtol=0)
        assert not torch.allclose(A, a.A.double(), atol=1e-3)


def test_the_dp_methods_named_in_messages_are_those_with_a_dp_space():
    from fedlora.core import available_methods
    from fedlora.core.privacy import DP_METHODS
    from fedlora.privacy import aggregator_state_stub

    have = {m for m in available_methods() if get_aggregator(m).dp_space(aggregator_state_stub()) is not None}
    assert set(DP_METHODS) == have


def test_methods_without_a_mechanism_are_refused():
    state = _state()
    with pytest.raises(AggregationError, match="'hexa' has no client-level DP"):
        private_aggregate(get_aggregator("hexa"), state, _updates(state), ClientDP(1.0, 1.0, 4.0), torch.Generator())


# ----------------------------------------------------------- checks and runs
DP = {"privacy__mode": "client", "fed__weighting": "uniform", "privacy__noise_multiplier": 0.5, "privacy__delta": 1e-3}


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"fed__method": "hexa"}, "fed.method=hexa has no client-level DP"),
        ({"fed__weighting": "data_size"}, "needs fed.weighting=uniform"),
        ({"privacy__target_epsilon": 3}, "not both"),
        ({"privacy__noise_multiplier": 0}, "without noise ε is infinite"),
        ({"privacy__delta": 0.5}, "must be below 1/num_clients"),
        ({"fed__eval_clients": "true"}, "eval_clients"),
        ({"fed__mode": "centralized"}, "centralized"),
        ({"privacy__noise_multiplier": 0, "privacy__target_epsilon": 1e-4}, "cannot be met"),
        ({"fed__method": "fedsb", "privacy__mode": "local"}, "fed.method=fedsb cannot train under privacy.mode=local"),
        ({"fed__max_update_ratio": 5}, "cannot take fed.max_update_ratio"),
        ({"fed__personal_eval": 0.2}, "fed.personal_eval"),
        ({"fed__method": "hexa", "privacy__mode": "local", "fed__options": "{class_aware_head: true}"}, "label counts"),
    ],
)
def test_settings_that_break_the_guarantee_are_refused_before_training(tiny_models, tmp_path, capsys, extra, message):
    out = tmp_path / "runs"
    argv = ["run", *overrides(tiny_models["bert"], out, partition__num_clients=6, **{"fed__method": "fedit", **DP, **extra})]
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("method", ["fedit", "ffa", "fra", "fedex", "fedsb"])
def test_a_client_dp_run_reports_the_accountants_epsilon_every_round(tiny_models, tmp_path, method):
    over = overrides(tiny_models["bert"], tmp_path, fed__method=method, partition__num_clients=6, fed__fraction=0.5, fed__rounds=3, **DP)
    assert cli.main(["run", *over]) == 0
    cfg = load_config(None, over)
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epsilon"] for r in rows] == pytest.approx([epsilon("rdp", 0.5, 0.5, t, 1e-3) for t in (1, 2, 3)], rel=1e-9)
    assert all(r["dp_noise_multiplier"] == 0.5 and 0 <= r["dp_clipped_fraction"] <= 1 for r in rows)
    # the noise the aggregation added (its std over the fixed denominator): z·C/(q·K), K = 6 clients, q = 0.5
    assert [r["dp_noise_std_of_mean"] for r in rows] == pytest.approx([0.5 * cfg.privacy.clip / (0.5 * 6)] * 3, rel=1e-12)
    assert len({r["clients"] for r in rows}) > 1 or cfg.seed != 0, "Poisson sampling: the number of clients varies"
    import json

    summary = json.loads((run / "summary.json").read_text())
    assert summary["epsilon"] == pytest.approx(rows[-1]["epsilon"]) and summary["delta"] == 1e-3
    assert (run / "privacy.png").read_bytes()[:4] == b"\x89PNG"  # the metric against ε


def test_a_target_epsilon_sets_the_noise_from_the_accountant(tiny_models, tmp_path):
    extra = {**DP, "privacy__noise_multiplier": 0, "privacy__target_epsilon": 5, "privacy__accountant": "prv"}
    cfg = load_config(None, overrides(tiny_models["bert"], tmp_path, fed__method="fedit", partition__num_clients=6, fed__fraction=0.5, fed__rounds=3, **extra))
    exp = build_experiment(cfg)
    z = exp.privacy.noise_multiplier
    assert z == pytest.approx(noise_for_epsilon("prv", 5, 1e-3, 0.5, 3))
    assert 4.9 <= exp.privacy.epsilon_after(3) <= 5.0


# ------------------------------------------------------------ local DP-SGD
def _tiny_fm(arch):
    from fedlora.models import FedModel, LoraSettings, tiny_causal_lm, tiny_model

    model, tok = tiny_causal_lm("llama", seed=1) if arch == "llama" else tiny_model("bert", seed=1)
    targets = ("q_proj", "v_proj") if arch == "llama" else ("query", "value")
    fm = FedModel(model, LoraSettings(targets, rank=4), head=arch != "llama")
    # Opacus records activations in training mode only: switch every dropout off instead of eval()
    for m in fm.peft.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("dropout_prob", "attention_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    fm.peft.train()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B = 0 at init would make A's gradients zero: give B values
        for layer in fm.layers.values():
            layer.lora_B["r4"].weight.normal_(0, 0.1, generator=g)
    return fm


def _batch(arch):
    ids = torch.tensor([[2, 31, 33, 40, 35, 3], [2, 45, 38, 44, 3, 0], [2, 50, 3, 0, 0, 0], [2, 41, 42, 43, 46, 3]])
    mask = (ids != 0).long()
    if arch == "llama":
        labels = ids.masked_fill(mask == 0, -100).masked_fill(torch.arange(6) < 2, -100)  # answer tokens only
    else:
        labels = torch.tensor([0, 1, 1, 0])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _single_example_grads(fm, batch, arch) -> dict[str, torch.Tensor]:
    """{parameter name: (n, *shape)} gradients of each example's loss, one example at a time."""
    params = [(n, p) for n, p in fm.peft.named_parameters() if p.requires_grad]
    rows = []
    for j in range(len(batch["input_ids"])):
        length = int(batch["attention_mask"][j].sum())
        ids, mask = batch["input_ids"][j : j + 1, :length], batch["attention_mask"][j : j + 1, :length]
        label = batch["labels"][j : j + 1, :length] if arch == "llama" else batch["labels"][j : j + 1]
        logits = fm.peft(input_ids=ids, attention_mask=mask).logits
        if arch == "llama":  # the mean over its answer tokens, written out here (not fedlora's per-example loss)
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), label[0, 1:], ignore_index=-100)
        else:
            loss = torch.nn.functional.cross_entropy(logits, label)
        rows.append(torch.autograd.grad(loss, [p for _, p in params]))
    return {n: torch.stack([r[i] for r in rows]) for i, (n, _) in enumerate(params)}


def _loss(fm, out_logits, labels, arch):
    from fedlora.engine.dp_sgd import _per_example_lm_loss

    if arch == "llama":
        return _per_example_lm_loss(out_logits, labels)
    return torch.nn.functional.cross_entropy(out_logits, labels)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_opacus_per_example_gradients_of_peft_lora_equal_single_example_autograd(arch):
    """Opacus issue #820: with peft LoRA layers it can silently compute wrong per-sample
    gradients. Reference: each example alone (cut to its own length, no padding) through the
    model and torch.autograd.grad, no Opacus involved."""
    from opacus import GradSampleModule

    fm = _tiny_fm(arch)
    batch = _batch(arch)
    names = [n for n, p in fm.peft.named_parameters() if p.requires_grad]
    want = _single_example_grads(fm, batch, arch)
    gsm = GradSampleModule(fm.peft, batch_first=True, loss_reduction="mean", strict=False)
    try:
        out = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        _loss(fm, out.logits, batch["labels"], arch).backward()
        got = {n: p.grad_sample for n, p in fm.peft.named_parameters() if p.requires_grad}
    finally:
        gsm._close()
    assert set(got) == set(names) and any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    for n in names:
        assert float(want[n].abs().max()) > 0, n
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-4, msg=n)


def test_dp_sgd_step_is_the_clipped_noiseless_mean_and_trains_the_weights_it_sends():
    """z = 0, q = 1 (batch ≥ n): the gradient AdamW receives is Σ_j clip(g_j)/n with the
    g_j from single-example autograd (independent); after training, the adapters read for upload are the trained ones."""
    from fedlora.config import TrainConfig
    from fedlora.engine.dp_sgd import LocalDP, train_local_dp

    fm = _tiny_fm("bert")
    batch = _batch("bert")
    C = 0.05
    params = {n: p.detach().clone() for n, p in fm.peft.named_parameters() if p.requires_grad}
    g = _single_example_grads(fm, batch, "bert")
    norms = torch.sqrt(sum(t.flatten(1).double().square().sum(1) for t in g.values()))
    clip = (C / norms).clamp(max=1.0)
    assert float(clip.max()) < 1, "the check has power: every example is clipped"
    expected = {n: (t * clip.view(-1, *[1] * (t.dim() - 1)).float()).sum(0) / 4 for n, t in g.items()}

    class Data:  # the four examples above stand for the engine's tokenised data (collate is replaced)
        lengths = batch["attention_mask"].sum(1).numpy()

    seen = {}
    import fedlora.engine.dp_sgd as dp_sgd

    real = dp_sgd.collate
    dp_sgd.collate = lambda data, idx, pad: {k: v[torch.as_tensor(idx)] for k, v in batch.items()}
    real_step = torch.optim.AdamW.step

    def capture(self, *a, **k):
        for group in self.param_groups:
            for p in group["params"]:
                seen[id(p)] = p.grad.detach().clone()
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = capture
    try:
        cfg = TrainConfig(lr=1e-2, steps=1, batch_size=8, warmup_ratio=0.0)
        import numpy as np

        train_local_dp(fm, Data(), np.arange(4), cfg, seed=0, dp=LocalDP(clip=C, noise_multiplier=0.0), pad_token_id=0)
    finally:
        dp_sgd.collate = real
        torch.optim.AdamW.step = real_step
    by_name = dict(fm.peft.named_parameters())
    for n, want in expected.items():
        torch.testing.assert_close(seen[id(by_name[n])], want, atol=1e-7, rtol=1e-4, msg=n)
    sent = fm.read_adapters()
    for mod, layer in fm.layers.items():
        assert torch.equal(sent[mod].B, layer.lora_B["r4"].weight.detach()) and not torch.equal(sent[mod].B, params[f"base_model.model.{mod}.lora_B.r4.weight"])
    assert not any(m._forward_hooks or m._backward_hooks for m in fm.peft.modules()), "Opacus' hooks were left on the shared model"


@pytest.mark.parametrize("z,batch_size", [(1.0, 4), (0.0, 2)], ids=["noise", "batches"])
def test_secure_noise_draws_what_nobody_can_regenerate_from_the_config(z, batch_size):
    """The same client trained twice from the same start, seed and examples: the run's seed fixes
    its Poisson batches and its noise, so the two agree; with privacy.secure_noise both come from
    the OS's entropy and the two differ, through the noise alone (z = 1, q = 1: every step takes
    every example) and through which examples each step drew alone (z = 0, q = 1/2). Before, secure mode drew its noise from
    torch's default generator, which the client had just seeded from the run's seed."""
    import numpy as np

    import fedlora.engine.dp_sgd as dp_sgd
    from fedlora.config import TrainConfig

    batch = _batch("bert")

    class Data:
        lengths = batch["attention_mask"].sum(1).numpy()

    cfg = TrainConfig(lr=1e-2, steps=3, batch_size=batch_size, warmup_ratio=0.0)  # q = batch_size / 4
    real, dp_sgd.collate = dp_sgd.collate, lambda data, idx, pad: {k: v[torch.as_tensor(np.sort(idx))] for k, v in batch.items()}
    try:
        trained = {}
        for secure in (False, True):
            for attempt in (0, 1):
                fm = _tiny_fm("bert")
                dp_sgd.train_local_dp(
                    fm, Data(), np.arange(4), cfg, seed=0, dp=dp_sgd.LocalDP(clip=0.05, noise_multiplier=z, secure_noise=secure), pad_token_id=0
                )
                trained[secure, attempt] = torch.cat([p.detach().flatten() for p in fm.trainable_parameters()])
    finally:
        dp_sgd.collate = real
    assert torch.equal(trained[False, 0], trained[False, 1])
    assert not torch.allclose(trained[True, 0], trained[True, 1], atol=1e-6)


@pytest.mark.parametrize("optimizer", [{}, {"optimizer": "sgd", "momentum": 0.9}], ids=["adamw", "sgd"])
def test_dp_sgd_without_noise_or_clipping_trains_as_the_plain_loop_over_many_steps(optimizer):
    """z = 0, a clip that never binds, q = 1: every step sees all four examples (as two
    length-sorted physical batches accumulated by Opacus) and must move the weights exactly as
    the plain training loop with the same logical batch (2 × 2 accumulated), AdamW state, head
    learning rate and schedule do (AdamW, or SGD with momentum), step after step (a one-step check cannot see optimiser state,
    schedule or accumulation going wrong; Opacus issue #820 was silent over many steps)."""
    import numpy as np

    import fedlora.engine.dp_sgd as dp_sgd
    import fedlora.engine.train as plain
    from fedlora.config import TrainConfig

    batch = _batch("bert")

    class Data:  # the four examples above stand for the engine's tokenised data (collate is replaced)
        lengths = batch["attention_mask"].sum(1).numpy()

    cfg = TrainConfig(lr=1e-2, head_lr=3e-2, epochs=5, batch_size=2, grad_accum=2, warmup_ratio=0.2, max_grad_norm=0.0, **optimizer)
    lookup = lambda data, idx, pad: {k: v[torch.as_tensor(np.sort(idx))] for k, v in batch.items()}  # noqa: E731
    trained = {}
    for name, module in (("dp", dp_sgd), ("plain", plain)):
        fm = _tiny_fm("bert")
        start = {n: p.detach().clone() for n, p in fm.peft.named_parameters() if p.requires_grad}
        real, module.collate = module.collate, lookup
        try:
            if name == "dp":
                stats = dp_sgd.train_local_dp(fm, Data(), np.arange(4), cfg, seed=0, dp=dp_sgd.LocalDP(clip=1e6, noise_multiplier=0.0), pad_token_id=0)
            else:
                stats = plain.train_local(fm, Data(), np.arange(4), cfg, seed=0, pad_token_id=0)
        finally:
            module.collate = real
        assert stats.steps == 5
        trained[name] = {n: p.detach().clone() for n, p in fm.peft.named_parameters() if p.requires_grad}
    for n, w in trained["plain"].items():
        assert not torch.equal(w, start[n]), f"{n} did not train: the check would have no power"
        torch.testing.assert_close(trained["dp"][n], w, atol=1e-6, rtol=1e-5, msg=n)


LOCAL = {"privacy__mode": "local", "privacy__noise_multiplier": 1.0, "privacy__clip": 1.0, "privacy__delta": 1e-3}


@pytest.mark.parametrize("method,mode", [("fedit", "federated"), ("hexa", "federated"), ("fedit", "centralized")])
def test_a_local_dp_run_reports_each_clients_epsilon(tiny_models, tmp_path, method, mode):
    from fedlora.engine.train import planned_steps

    over = overrides(tiny_models["bert"], tmp_path, fed__method=method, fed__mode=mode, fed__rounds=2, **LOCAL)
    assert cli.main(["run", *over]) == 0
    cfg = load_config(None, over)
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows, clients = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "clients.jsonl")
    exp = build_experiment(cfg)
    for t, row in enumerate(rows, start=1):
        eps = []
        for c in exp.clients:
            n = len(c.indices)
            q = min(1.0, cfg.train.batch_size / n)
            eps.append(epsilon("rdp", 1.0, q, planned_steps(n, cfg.train) * t, 1e-3))
            mine = [r for r in clients if r["client"] == c.client_id and r["round"] == t]
            assert mine and mine[0]["epsilon"] == pytest.approx(eps[-1], rel=1e-9)
        assert row["epsilon"] == pytest.approx(max(eps), rel=1e-9)
    assert rows[1]["epsilon"] > rows[0]["epsilon"] > 0


def test_a_node_whose_own_data_would_overspend_the_target_is_refused():
    """A Flower node training on its own examples, which the server's plan (z for the target ε
    over the planned rounds, from its partitions' sizes) never saw: at the planned size it
    spends at most the target; with fewer examples (larger q) more, and it is refused."""
    from fedlora.engine.train import planned_steps
    from fedlora.privacy import plan_privacy

    cfg = load_config(None, ["privacy.mode=local", "privacy.target_epsilon=3", "privacy.delta=1e-4", "fed.rounds=4", "train.batch_size=16"])
    plan = plan_privacy(cfg, get_aggregator("fedit"), [400, 400])
    for n in (400, 1000):
        plan.check_local_client(n, cfg)
        assert epsilon("rdp", plan.noise_multiplier, 16 / n, planned_steps(n, cfg.train) * 4, 1e-4) <= 3
    assert epsilon("rdp", plan.noise_multiplier, 16 / 100, planned_steps(100, cfg.train) * 4, 1e-4) > 3
    with pytest.raises(ConfigError, match="this node's 100 examples would spend"):
        plan.check_local_client(100, cfg)
    with pytest.raises(ConfigError, match="privacy.delta=0.0001 must be below"):
        plan.check_local_client(20_000, cfg)  # δ = 1e-4 ≥ 1/n


@pytest.mark.parametrize("failure", ["diverged", "no reply"])
def test_a_dropped_clients_steps_still_count_in_its_epsilon(tiny_models, tmp_path, monkeypatch, failure):
    """Local DP, client1's round-2 update dropped: sent and refused by the server (diverged), or
    no reply (a failed or late node: it may have trained, and a late reply reaches the server).
    Either way its ε after round 2 is the accountant's for two rounds of its steps (reference:
    Opacus through fedlora.privacy.epsilon on q and the planned steps), and so is the run's."""
    import fedlora.engine.simulator as simulator
    from fedlora.engine.server import ClientResult
    from fedlora.engine.train import planned_steps

    real = simulator.Simulator.train

    def train(self, job, progress=None):
        res = real(self, job, progress)
        if job.client.client_id == "client1" and job.round == 2:
            if failure == "no reply":
                return ClientResult(error="node did not reply in time")
            u = res.update
            res = ClientResult(
                ClientUpdate(u.client_id, u.num_examples, {m: Adapter(a.B * 1e25, a.A, a.scale) for m, a in u.adapters.items()}, u.dense), res.stats
            )
        return res

    monkeypatch.setattr(simulator.Simulator, "train", train)
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedit", fed__rounds=2, **LOCAL)
    assert cli.main(["run", *over]) == 0
    cfg = load_config(None, over)
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows, clients = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "clients.jsonl")
    assert rows[1]["dropped"] == 1
    (dropped,) = [c for c in clients if "dropped" in c]
    assert dropped["client"] == "client1" and dropped["round"] == 2
    n = len(build_experiment(cfg).clients[1].indices)
    want = epsilon("rdp", 1.0, min(1.0, cfg.train.batch_size / n), 2 * planned_steps(n, cfg.train), 1e-3)
    assert dropped["epsilon"] == pytest.approx(want, rel=1e-9)
    assert rows[1]["epsilon"] >= want


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"train__gradient_checkpointing": "true"}, "gradient_checkpointing"),
        ({"privacy__delta": 0.1}, "smallest client"),
    ],
)
def test_local_dp_settings_that_break_it_are_refused(tiny_models, tmp_path, capsys, extra, message):
    out = tmp_path / "runs"
    assert cli.main(["run", *overrides(tiny_models["bert"], out, **{**LOCAL, **extra})]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_a_dp_grid_in_compare_plots_utility_against_epsilon(tiny_models, tmp_path):
    base = overrides(tiny_models["bert"], tmp_path / "runs", fed__rounds=1, partition__num_clients=6, fed__weighting="uniform", privacy__delta=1e-3)
    specs = "fedit,fedit[privacy.mode=client,privacy.target_epsilon=8],ffa,ffa[privacy.mode=client,privacy.target_epsilon=8]"
    assert cli.main(["compare", *base, "--methods", specs, "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "results.md").read_text()
    assert "| fedit[privacy.mode=client,privacy.target_epsilon=8] |" in text
    assert (tmp_path / "report" / "results_epsilon.png").read_bytes()[:4] == b"\x89PNG"


def test_the_clip_skew_probe_on_a_hand_computed_client():
    """benchmarks/dp_clip_skew.py's statistics on three gradients worked by hand (C = 0.1; the
    last two coordinates are the head's bias): g1 = (0, .3, −.4) and g2 = (.2, 0, 0) of the
    majority class 1, g3 = (0, 0, .05) of class 0."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("dp_clip_skew", Path(__file__).resolve().parents[1] / "benchmarks" / "dp_clip_skew.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    g = torch.tensor([[0.0, 0.3, -0.4], [0.2, 0.0, 0.0], [0.0, 0.0, 0.05]], dtype=torch.float64)
    out = probe.client_stats(g, torch.tensor([1, 1, 0]).numpy(), 1, 0.1, slice(1, 3))
    assert out["clipped"] == pytest.approx(2 / 3) and out["share_majority"] == pytest.approx(2 / 3)
    assert out["norm_majority"] == pytest.approx(0.35) and out["norm_minority"] == pytest.approx(0.05)
    assert out["mass_majority"] == pytest.approx(0.7 / 0.75) and out["mass_majority_clipped"] == pytest.approx(0.2 / 0.25)
    # unclipped step −Σ g_i = (−.2, −.3, .35): bias difference .35 − (−.3) = .65, over √2 · ‖step‖ = √2 · √.2525
    assert out["bias_push"] == pytest.approx(0.65 / (2**0.5 * 0.2525**0.5))
    # clipped step −(.1·(0, .6, −.8) + .1·(1, 0, 0) + .05·(0, 0, 1)) = (−.1, −.06, .03): .09 over √2 · √.0145
    assert out["bias_push_clipped"] == pytest.approx(0.09 / (2**0.5 * 0.0145**0.5))


def test_a_failed_clients_steps_are_those_of_its_last_report_even_a_refused_one():
    """Local DP, a client that fails: charged the steps and q of its last report, a report whose
    update the server refused included (the client took those steps); one never heard from and
    holding no partition the server knows (data.node_data) is charged nothing, and that is logged."""
    from types import SimpleNamespace

    from fedlora.engine.server import Server

    cfg = load_config(None, ["privacy.mode=local", "privacy.noise_multiplier=1"])
    plan = SimpleNamespace(local=object())
    job = SimpleNamespace(round=3, client=SimpleNamespace(client_id="client1", indices=[]))
    refused = {"round": 1, "client": "client1", "rank": 8, "dropped": "update norm 9 exceeds fed.max_update_norm=1", "steps": 7, "sample_rate": 0.16}
    server = SimpleNamespace(
        exp=SimpleNamespace(privacy=plan), cfg=cfg, client_rows=[{"round": 1, "client": "client0", "steps": 3, "sample_rate": 0.5}, refused]
    )
    assert Server._planned_dp(server, job) == {"steps": 7, "sample_rate": 0.16}
    server.client_rows = [{"round": 1, "client": "client0", "steps": 3, "sample_rate": 0.5}]
    assert Server._planned_dp(server, job) == {}


def test_steps_at_two_sampling_rates_compose_as_two_mechanisms():
    """A node that restarts with other rows trains at another q: its ε is Opacus' for the two
    mechanisms composed, not all its steps at its last q (which understates it here)."""
    from opacus.accountants import RDPAccountant

    from fedlora.privacy import PrivacyPlan

    plan = PrivacyPlan("local", "rdp", 1e-5, 1.2, 0.0)
    rows = [
        {"client": "c", "steps": 40, "sample_rate": 0.2},
        {"client": "c", "steps": 40, "sample_rate": 0.02},
        {"client": "d", "steps": 5, "sample_rate": 0.1},
    ]
    acc = RDPAccountant()
    acc.history = [(1.2, 0.2, 40), (1.2, 0.02, 40)]
    got = plan.local_epsilon(rows, {"c", "d"})
    assert got["c"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert got["c"] > epsilon("rdp", 1.2, 0.02, 80, 1e-5)
    assert got["d"] == pytest.approx(epsilon("rdp", 1.2, 0.1, 5, 1e-5), rel=1e-12)


def test_dp_sgd_under_bf16_autocast_clips_in_float32(monkeypatch):
    """Under bf16 autocast Opacus' hooks give bf16 per-example gradients, and it would take their norms
    and clip them in bf16: a clipped gradient could come out above C (the accountant's sensitivity).
    What Opacus clips must be float32 (then min(1, C/‖g_j‖)·g_j ≤ C to float32 round-off)."""
    import numpy as np
    from opacus.optimizers import DPOptimizer

    import fedlora.engine.dp_sgd as dp_sgd
    from fedlora.config import TrainConfig
    from fedlora.engine.dp_sgd import LocalDP, train_local_dp
    from fedlora.models.device import Placement

    fm = _tiny_fm("bert")
    fm.placement = Placement(torch.device("cpu"), torch.bfloat16)
    batch = _batch("bert")
    C = 0.05
    seen = []
    real_clip = DPOptimizer.clip_and_accumulate

    def spy(self):
        samples = [p.grad_sample for p in self.params if p.requires_grad]
        norms = torch.stack([g.reshape(len(g), -1).double().norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
        seen.append(([g.dtype for g in samples], norms))
        return real_clip(self)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy)

    class Data:
        lengths = batch["attention_mask"].sum(1).numpy()

    monkeypatch.setattr(dp_sgd, "collate", lambda data, idx, pad: {k: v[torch.as_tensor(idx)] for k, v in batch.items()})
    train_local_dp(
        fm,
        Data(),
        np.arange(4),
        TrainConfig(lr=1e-2, steps=2, batch_size=8, warmup_ratio=0.0),
        seed=0,
        dp=LocalDP(clip=C, noise_multiplier=0.0),
        pad_token_id=0,
    )
    assert seen and all(d == torch.float32 for dtypes, _ in seen for d in dtypes), "Opacus clipped half-precision gradients"
    assert all(float(norms.min()) > C for _, norms in seen), "the check has power: every example is clipped"


def _flower_local_dp(tiny_models, tmp_path, monkeypatch, change):
    """A two-round local-DP run on Flower (fedit), client1's round-2 reply changed by ``change(update, stats)``."""
    from test_flower import run_flower

    import fedlora.flower.client_app as client_module

    real, calls = client_module.run_client, {}

    def run_client(fm, start, client, *a, **kw):
        update, stats = real(fm, start, client, *a, **kw)
        calls[client.client_id] = calls.get(client.client_id, 0) + 1
        if client.client_id == "client1" and calls["client1"] == 2:
            update, stats = change(update, stats)
        return update, stats

    monkeypatch.setattr(client_module, "run_client", run_client)
    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedit", fed__rounds=2, **LOCAL)
    server, _, _ = run_flower(over, tmp_path)
    (dropped,) = [r for r in server.client_rows if "dropped" in r]
    assert dropped["client"] == "client1" and dropped["round"] == 2
    cfg = server.cfg
    n = len(server.exp.clients[1].indices)
    q, planned = min(1.0, cfg.train.batch_size / n), planned_steps_of(n, cfg)
    return server, dropped, q, planned


def planned_steps_of(n, cfg):
    from fedlora.engine.train import planned_steps

    return planned_steps(n, cfg.train)


def test_on_flower_a_refused_reply_is_charged_the_steps_it_reports(tiny_models, tmp_path, monkeypatch):
    """Local DP on Flower: client1's round-2 update diverged (refused by the server's check) and
    reports three times the planned steps. The node trained them: its ε is the accountant's for
    round 1's steps and those three (before, a refused reply's stats were thrown away and the
    server charged the planned steps)."""

    def diverged(update, stats):
        stats.steps *= 3
        return ClientUpdate(
            update.client_id, update.num_examples, {m: Adapter(a.B * 1e25, a.A, a.scale) for m, a in update.adapters.items()}, update.dense
        ), stats

    server, dropped, q, planned = _flower_local_dp(tiny_models, tmp_path, monkeypatch, diverged)
    assert "bad update" in dropped["dropped"] and dropped["steps"] == 3 * planned
    assert dropped["epsilon"] == pytest.approx(epsilon("rdp", 1.0, q, 4 * planned, 1e-3), rel=1e-9)
    assert server.rounds[-1]["epsilon"] >= dropped["epsilon"]


def test_under_local_dp_a_reply_without_a_sampling_rate_is_refused(tiny_models, tmp_path, monkeypatch):
    """A node that trained without DP-SGD (its reply has no sampling rate) is dropped, not
    aggregated, and charged the steps of its last report."""

    def not_private(update, stats):
        stats.sample_rate = 0.0  # what a node training without DP-SGD reports (as_dict leaves the rate out)
        return update, stats

    server, dropped, q, planned = _flower_local_dp(tiny_models, tmp_path, monkeypatch, not_private)
    assert "no DP-SGD sampling rate" in dropped["dropped"] and server.rounds[-1]["clients"] == 2
    assert dropped["epsilon"] == pytest.approx(epsilon("rdp", 1.0, q, 2 * planned, 1e-3), rel=1e-9)


def test_a_failed_round_under_local_dp_is_charged_when_it_is_replayed(tiny_models, tmp_path, monkeypatch):
    """Every round-2 update refused, so the round fails and the run stops; resumed, round 2 runs
    again. The clients trained twice in round 2 (and the failed attempt's updates reached the
    server): each client's ε is the accountant's for three rounds of its steps (before, the failed
    attempt's steps were never recorded, and the resumed run reported two rounds' ε)."""
    import fedlora.engine.simulator as simulator
    from fedlora.engine import run_experiment
    from fedlora.engine.server import RoundFailed

    real = simulator.Simulator.train

    def train(self, job, progress=None):
        res = real(self, job, progress)
        if job.round == 2:
            u = res.update
            res = ClientResult(
                ClientUpdate(u.client_id, u.num_examples, {m: Adapter(a.B * 1e25, a.A, a.scale) for m, a in u.adapters.items()}, u.dense), res.stats
            )
        return res

    from fedlora.engine.server import ClientResult

    over = overrides(tiny_models["bert"], tmp_path, fed__method="fedit", fed__rounds=2, **LOCAL)
    cfg = load_config(None, over)
    monkeypatch.setattr(simulator.Simulator, "train", train)
    with pytest.raises(RoundFailed):
        run_experiment(cfg, plots=False)
    monkeypatch.setattr(simulator.Simulator, "train", real)
    summary = run_experiment(cfg, plots=False)
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    clients = read_jsonl(run / "clients.jsonl")
    assert sum(1 for c in clients if c["round"] == 2 and "dropped" in c) == 3 and sum(1 for c in clients if c["round"] == 2) == 6
    exp = build_experiment(cfg)
    for i, client in enumerate(exp.clients):
        n = len(client.indices)
        want = epsilon("rdp", 1.0, min(1.0, cfg.train.batch_size / n), 3 * planned_steps_of(n, cfg), 1e-3)
        (last,) = [c for c in clients if c["client"] == client.client_id and c["round"] == 2 and "dropped" not in c]
        assert last["epsilon"] == pytest.approx(want, rel=1e-9), i
    assert summary["epsilon"] == pytest.approx(max(c["epsilon"] for c in clients if "epsilon" in c), rel=1e-12)


def test_local_dp_refuses_a_precision_that_resolves_to_fp16(tiny_models, tmp_path, monkeypatch):
    """train.precision=auto on a GPU without bf16 resolves to fp16; DP-SGD has no gradient scaler, so
    it is refused before anything loads, naming the setting."""
    import fedlora.engine.experiment as experiment
    from fedlora.models.device import Placement

    monkeypatch.setattr(experiment, "resolve_placement", lambda device, precision: Placement(torch.device("cpu"), torch.float16))
    cfg = load_config(None, overrides(tiny_models["bert"], tmp_path, **LOCAL))
    with pytest.raises(ConfigError, match="resolved to fp16"):
        build_experiment(cfg)
