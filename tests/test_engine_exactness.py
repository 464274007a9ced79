"""Exactness end to end, on real (tiny) transformer models.

After one federated round of an exact method, the engine's global model (base weights with
the folded residual + the global adapter, heads averaged) must be the model a dense
reference builds on its own: the pretrained model with Σ_i p_i·s_i·B_i·A_i added to every
adapted weight (in float64, transposed for GPT-2's Conv1D) and the p-weighted head.
"""

from __future__ import annotations

import pytest
import torch
from engine_support import GLUE, overrides, tiny_models  # noqa: F401

from fedlora.config import load_config
from fedlora.engine import Simulator, build_experiment

CASES = {
    # name: (arch, method overrides)
    "bert-fedex": ("bert", {"fed__method": "fedex"}),
    "bert-hexa-mixed": ("bert", {"fed__method": "hexa", "fed__options": "{drift_beta: 0}", "model__client_ranks": "[4,2]"}),
    "gpt2-fedex": ("gpt2", {"fed__method": "fedex", "model__target_modules": "[c_attn]"}),
    "gpt2-hexa": ("gpt2", {"fed__method": "hexa", "fed__options": "{drift_beta: 0}", "model__target_modules": "[c_attn]"}),
}


def _sentences(n: int = 16) -> list[str]:
    lines = (GLUE / "SST-2" / "dev.tsv").read_text().splitlines()[1 : n + 1]
    return [line.split("\t")[0] for line in lines]


def _pad_cols(M: torch.Tensor, r: int) -> torch.Tensor:
    return torch.cat([M, M.new_zeros(M.shape[0], r - M.shape[1])], dim=1)


def _one_round(cfg, run_dir):
    exp = build_experiment(cfg)
    captured = []
    real = exp.aggregator.aggregate

    def capture(state, updates):
        captured.extend(updates)
        return real(state, updates)

    exp.aggregator.aggregate = capture
    run_dir.mkdir()
    sim = Simulator(exp, run_dir)
    state = sim.run()
    return exp, sim, state, captured


@pytest.mark.filterwarnings("error:fan_in_fan_out:UserWarning")  # the export sets it for Conv1D
@pytest.mark.parametrize("case", list(CASES))
def test_global_model_equals_dense_reference(tiny_models, tmp_path, case):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.pytorch_utils import Conv1D

    arch, extra = CASES[case]
    model_dir = tiny_models[arch]
    cfg = load_config(None, overrides(model_dir, tmp_path, fed__rounds=1, partition__num_clients=3, train__lr=5e-3, **extra))
    exp, sim, state, updates = _one_round(cfg, tmp_path / "run")
    assert state.round == 1 and len(updates) == 3

    # weights p_i = n_i / Σ n_j, from the partition sizes
    sizes = [len(c.indices) for c in exp.clients]
    assert sum(sizes) == 80 and [u.num_examples for u in updates] == sizes
    p = [n / sum(sizes) for n in sizes]
    # each client's scaling is α / r_i (no rslora)
    ranks = [4, 2, 4] if "mixed" in case else [4, 4, 4]
    for u, r in zip(updates, ranks):
        for a in u.adapters.values():
            assert a.rank == r and a.scale == pytest.approx(cfg.model.alpha / r)

    # the dense reference: the pretrained model + Σ p_i·s_i·B_i·A_i, the averaged head
    ref = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    naive = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    modules = list(updates[0].adapters)
    assert len(modules) == (4 if arch == "bert" else 2)
    with torch.no_grad():
        for name in modules:
            delta = sum(pi * (cfg.model.alpha / r) * u.adapters[name].B.double() @ u.adapters[name].A.double() for pi, u, r in zip(p, updates, ranks))
            # naive FedAvg of the factors (lower ranks zero-padded to rank 4)
            B_mean = sum(pi * _pad_cols(u.adapters[name].B.double() * (cfg.model.alpha / r), 4) for pi, u, r in zip(p, updates, ranks))
            A_mean = sum(pi * _pad_cols(u.adapters[name].A.double().T, 4).T for pi, u in zip(p, updates))
            for model, d in ((ref, delta), (naive, B_mean @ A_mean)):  # naive: FedAvg of the factors
                module = model.get_submodule(name)
                w = module.weight
                if isinstance(module, Conv1D):  # stored in×out
                    assert arch == "gpt2"
                    w.copy_((w.double() + d.T).to(w.dtype))
                else:
                    assert isinstance(module, torch.nn.Linear)
                    w.copy_((w.double() + d).to(w.dtype))
        for model in (ref, naive):
            params = dict(model.named_parameters())
            for key in updates[0].dense:
                avg = sum(pi * u.dense[key].double() for pi, u in zip(p, updates))
                params[key].copy_(avg.to(params[key].dtype))

    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok(_sentences(), padding=True, return_tensors="pt")
    with torch.no_grad():
        with exp.fm.global_view(exp.aggregator.global_delta(state), state.dense) as model:
            model.eval()
            engine = model(**batch).logits
            # the effective weights of the global model, in the module's own storage layout
            engine_w = {name: exp.fm.deltas.effective_weight(name).float() for name in modules}
        expected = ref(**batch).logits
        pretrained = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()(**batch).logits

    torch.testing.assert_close(engine, expected, atol=1e-5, rtol=1e-5)
    assert (expected - pretrained).abs().max() > 1e-4, "training moved the model"
    pre = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    for name in modules:
        want, bad = ref.get_submodule(name).weight, naive.get_submodule(name).weight
        torch.testing.assert_close(engine_w[name], want, atol=2e-7, rtol=0)
        moved = (want - pre.get_submodule(name).weight).abs().max()
        assert moved > 1e-3
        # the check has power: FedAvg of the factors is off by far more than the tolerance
        assert (bad - want).abs().max() > 1e-5
    # the exported peft adapter (the whole update on the pretrained base) is the same model
    from peft import PeftModel

    from fedlora.models.export import export_peft_adapter

    export_peft_adapter(exp.fm, sim.total_delta(state), state.dense, str(model_dir), 2, False, tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    exported = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        for name in modules:  # the merged weights, too
            layer = exported.base_model.model.get_submodule(name)
            merged = layer.get_base_layer().weight + layer.get_delta_weight("default")
            torch.testing.assert_close(merged, ref.get_submodule(name).weight, atol=2e-7, rtol=0)

    # the engine shipped the exact residual as a non-zero base delta
    assert state.base_delta and any(float(d.L.norm()) * float(d.R.norm()) > 0 for d in state.base_delta.values())
