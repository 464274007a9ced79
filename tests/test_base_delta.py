"""Base deltas beside W0 (``model.base_delta=factored``) against a dense float64 reference.

The reference is built independently: a second copy of the same pretrained model whose
weights get W0 + Σ_t L_t·R_t computed in float64 (transposed for GPT-2's Conv1D). The
engine's model never forms that sum; it adds L·(R·x) in a forward hook.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_support import overrides, read_jsonl, tiny_models  # noqa: F401
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedlora import cli
from fedlora.core import Factored
from fedlora.models import FedModel, LoraSettings, tiny_causal_lm, tiny_model
from fedlora.models.base_delta import BaseDeltas

ARCHS = {
    "bert": (lambda: tiny_model("bert", seed=3), ("query", "value")),
    "gpt2": (lambda: tiny_model("gpt2", seed=3), ("c_attn",)),  # Conv1D, stored in×out
    "llama": (lambda: tiny_causal_lm("llama", seed=3), ("q_proj", "v_proj")),
}


def _fedmodel(arch: str, mode: str) -> FedModel:
    build, targets = ARCHS[arch]
    model, _ = build()
    return FedModel(model.eval(), LoraSettings(targets, rank=4), head=arch != "llama", base_delta=mode)


def _deltas(fm: FedModel, rank: int, seed: int) -> dict[str, Factored]:
    g = torch.Generator().manual_seed(seed)
    return {mod: Factored(torch.randn(m, rank, generator=g) * 0.5, torch.randn(rank, n, generator=g) * 0.5) for mod, (m, n) in fm.shapes.items()}


def _reference(arch: str, rounds: list[dict[str, Factored]]) -> nn.Module:
    model, _ = ARCHS[arch][0]()
    with torch.no_grad():
        for name in rounds[0]:
            module = model.get_submodule(name)
            total = sum(d[name].L.double() @ d[name].R.double() for d in rounds)
            w = module.weight
            w.copy_((w.double() + (total.T if isinstance(module, Conv1D) else total)).to(w.dtype))
    return model.eval()


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[2, 31, 33, 40, 35, 3], [2, 45, 38, 44, 3, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs()).logits


@pytest.mark.parametrize("arch", list(ARCHS))
def test_factored_base_equals_dense_reference_and_never_writes_w0(arch):
    fm = _fedmodel(arch, "factored")
    w0 = {mod: fm.base_weight(mod).detach().clone() for mod in fm.layers}
    rounds = [_deltas(fm, rank=1, seed=s) for s in range(4)]  # rank ≤ 4: factors still pay at these tiny widths
    for d in rounds:
        fm.fold(d)
    ref = _reference(arch, rounds)
    with fm.peft.disable_adapter():
        torch.testing.assert_close(_logits(fm.peft), _logits(ref), atol=2e-5, rtol=1e-5)
    for mod in fm.layers:
        assert torch.equal(fm.base_weight(mod), w0[mod]), "factored mode wrote W0"
        torch.testing.assert_close(fm.deltas.effective_weight(mod), ref.get_submodule(mod).weight.double(), atol=1e-6, rtol=0)
    # the check has power: without the side terms the model is the pretrained one
    assert (_logits(ref) - _logits(ARCHS[arch][0]()[0].eval())).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_fold_and_factored_give_the_same_model(arch):
    folded, factored = _fedmodel(arch, "fold"), _fedmodel(arch, "factored")
    for s in range(3):
        d = _deltas(folded, rank=2, seed=s)
        folded.fold(d)
        factored.fold(d)
    assert not folded.deltas.sides and factored.deltas.sides
    with folded.peft.disable_adapter(), factored.peft.disable_adapter():
        torch.testing.assert_close(_logits(factored.peft), _logits(folded.peft), atol=2e-5, rtol=1e-5)


def test_the_side_stays_at_its_numerical_rank():
    """Five rank-2 deltas from one 2-dimensional column and row space sum to rank 2."""
    fm = _fedmodel("bert", "factored")
    g = torch.Generator().manual_seed(0)
    mod = "bert.encoder.layer.0.attention.self.query"
    U, V = torch.randn(32, 2, generator=g), torch.randn(2, 32, generator=g)
    rounds = []
    for _ in range(5):
        rounds.append({mod: Factored(U @ torch.randn(2, 2, generator=g), torch.randn(2, 2, generator=g) @ V)})
        fm.fold(rounds[-1])
    side = fm.deltas.sides[mod]
    assert side.L.shape[1] == 2 and side.compressed_rank == 2  # appended to 6, then cut back to 2
    want = fm.base_weight(mod).double() + sum(d[mod].L.double() @ d[mod].R.double() for d in rounds)
    torch.testing.assert_close(fm.deltas.effective_weight(mod), want, atol=1e-6 * float(want.abs().max()), rtol=0)  # float32 round-off


def test_a_side_that_outgrows_its_budget_is_folded_into_a_full_precision_w0():
    fm = _fedmodel("bert", "factored")
    w0 = {mod: fm.base_weight(mod).double().clone() for mod in fm.layers}
    d = _deltas(fm, rank=10, seed=1)  # 10·(32+32)·2 ≥ 32·32: factors no longer pay
    fm.fold(d)
    assert not fm.deltas.sides
    for mod in fm.layers:
        want = w0[mod] + d[mod].L.double() @ d[mod].R.double()
        torch.testing.assert_close(fm.base_weight(mod).double(), want, atol=1e-6 * float(want.abs().max()), rtol=0)  # float32 round-off


def test_temporary_deltas_leave_nothing_behind():
    fm = _fedmodel("llama", "fold")
    fm.fold(_deltas(fm, rank=2, seed=0))
    w = {mod: fm.base_weight(mod).detach().clone() for mod in fm.layers}
    before = _logits(fm.peft)
    with fm.folded(_deltas(fm, rank=3, seed=1)):
        assert (_logits(fm.peft) - before).abs().max() > 1e-3
    torch.testing.assert_close(_logits(fm.peft), before, atol=0, rtol=0)
    assert all(torch.equal(fm.base_weight(mod), w[mod]) for mod in fm.layers)
    assert not fm.deltas.sides and all(not layer.get_base_layer()._forward_hooks for layer in fm.layers.values())


class _Int8Linear(nn.Module):
    """A stand-in for a bitsandbytes 8-bit layer: W = scale·Q with Q int8 (no float W0 to add to)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.scale = w.abs().max() / 127
        self.weight = nn.Parameter(torch.round(w / self.scale).to(torch.int8), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        return self.weight.double() * self.scale.double()

    def forward(self, x):
        return x @ (self.weight.float() * self.scale).T


def test_a_quantized_w0_keeps_its_deltas_beside_it_exactly():
    g = torch.Generator().manual_seed(0)
    layer = _Int8Linear(torch.randn(24, 16, generator=g))
    q = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="quantized"):
        BaseDeltas({"q": layer}, {"q": False}, "fold")
    deltas = BaseDeltas({"q": layer}, {"q": False}, "auto")
    assert deltas.mode == "factored"
    x = torch.randn(5, 16, generator=g)
    total = torch.zeros(24, 16, dtype=torch.float64)
    for rank in (2, 3, 12):  # the last one makes factors dearer than a dense 24×16 side matrix
        d = Factored(torch.randn(24, rank, generator=g), torch.randn(rank, 16, generator=g))
        deltas.fold({"q": d})
        total += d.L.double() @ d.R.double()
        want = x.double() @ (layer.dequantized() + total).T
        torch.testing.assert_close(layer(x).double(), want, atol=1e-4, rtol=1e-5)
    side = deltas.sides["q"]
    assert side.L is None and side.D is not None and side.D.shape == (24, 16)
    assert torch.equal(layer.weight, q), "the quantized W0 was written"
    state = deltas.state()
    assert set(state) == {"q/D"}, "a quantized W0 is not checkpointed (it never changes)"
    fresh = BaseDeltas({"q": layer}, {"q": False}, "auto")
    deltas.load_state({})  # back to the bare W0 …
    torch.testing.assert_close(layer(x).double(), x.double() @ layer.dequantized().T, atol=1e-4, rtol=1e-5)
    fresh.load_state(state)  # … and the checkpointed side restores the model
    torch.testing.assert_close(layer(x).double(), x.double() @ (layer.dequantized() + total).T, atol=1e-4, rtol=1e-5)


def test_state_round_trip_and_the_old_checkpoint_format():
    fm = _fedmodel("gpt2", "factored")
    for s in range(3):
        fm.fold(_deltas(fm, rank=2, seed=s))
    state = fm.base_state()
    other = _fedmodel("gpt2", "factored")
    other.load_base_state(state)
    with fm.peft.disable_adapter(), other.peft.disable_adapter():
        torch.testing.assert_close(_logits(other.peft), _logits(fm.peft), atol=0, rtol=0)
    # A reloaded model compresses later rounds as the original does (bit for bit): the singular
    # values of its compressed prefix were saved, so it keeps the cheaper basis update (SVD.plus).
    first, again = _fedmodel("gpt2", "factored"), _fedmodel("gpt2", "factored")
    first.fold(_deltas(first, rank=2, seed=0))  # compressed to rank 2
    again.load_base_state(first.base_state())
    for s in (1, 2):  # 4 columns, then 6 > 2·2: compressed again
        d = _deltas(first, rank=2, seed=s)
        first.fold(d)
        again.fold(d)
    for mod, side in first.deltas.sides.items():
        assert side.compressed_rank == 6
        assert torch.equal(again.deltas.sides[mod].L, side.L) and torch.equal(again.deltas.sides[mod].R, side.R)
    old = {mod: fm.base_weight(mod).detach().clone() + 1.0 for mod in fm.layers}  # {module: W0}, before side terms
    other.load_base_state(old)
    assert not other.deltas.sides and all(torch.equal(other.base_weight(m), old[m]) for m in old)


@pytest.mark.parametrize("method,extra", [("fedex", {}), ("hexa", {"model__client_ranks": "[4,2,4]"})])
def test_a_run_with_factored_base_deltas_equals_one_that_folds(tiny_models, tmp_path, method, extra):
    """The whole engine (folds every round, HEXA's client-only deltas, evaluation, export)."""
    runs = {}
    for mode in ("fold", "factored"):
        out = tmp_path / mode
        assert cli.main(["run", *overrides(tiny_models["bert"], out, fed__method=method, model__base_delta=mode, train__lr=5e-3, **extra)]) == 0
        (run,) = [p for p in out.iterdir() if p.is_dir()]
        runs[mode] = run
    a, b = (read_jsonl(runs[m] / "metrics.jsonl") for m in ("fold", "factored"))
    for ra, rb in zip(a, b, strict=True):
        keys = [k for k in ra if k.startswith(("eval_", "train_loss")) and k != "eval_s"]
        assert keys and [k for k in rb if k in keys] == keys
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), k
    from safetensors.torch import load_file

    ta, tb = (load_file(Path(runs[m]) / "adapter" / "adapter_model.safetensors") for m in ("fold", "factored"))
    assert ta.keys() == tb.keys()
    for k in (k for k in ta if "lora_A" in k):  # the global update B·A (an SVD's signs may differ)
        kb = k.replace("lora_A", "lora_B")
        torch.testing.assert_close(tb[kb] @ tb[k], ta[kb] @ ta[k], atol=1e-5, rtol=1e-3)
    assert json.loads((runs["factored"] / "summary.json").read_text())["final"]


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_flowertune_example_loads_and_is_refused_without_cuda(tmp_path, capsys):
    """FlowerTune's general-NLP setting (ecosystem.md 1.10): validated by the config loader;
    on this CUDA-less machine, one error line before anything is loaded or written."""
    from fedlora.config import load_config

    cfg = load_config(EXAMPLES / "flowertune_general_nlp.yaml")
    assert (cfg.model.quantization, cfg.model.rank, cfg.model.alpha, cfg.model.max_length) == ("4bit", 32, 64.0, 512)
    assert (cfg.partition.num_clients, cfg.fed.fraction, cfg.train.steps, cfg.train.batch_size) == (20, 0.1, 10, 16)
    assert cfg.data.task == "instruct" and cfg.data.train_file.endswith("examples/data/alpaca_gpt4_train.jsonl")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    out = tmp_path / "runs"
    assert cli.main(["run", str(EXAMPLES / "flowertune_general_nlp.yaml"), f"output_dir={out}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("fedlora: error:") and "CUDA" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("quantized", [False, True])
def test_bench_base_delta_reports_the_side_growing_then_folded_or_dense(capsys, quantized):
    """768×768 modules, ΔW0 of inner dimension 64 per round: 64, 128, then 192 reaches
    192·(768+768)·2 ≥ 768² — folded into W0 (side 0), or a dense side beside a quantized W0."""
    argv = ["bench", "base-delta", "--preset", "roberta-base", "--layers", "1", "--rounds", "4", "--delta-rank", "64", "--tokens", "8"]
    assert cli.main(argv + (["--quantized"] if quantized else [])) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r[3].strip() for r in rows] == (["64", "128", "dense", "dense"] if quantized else ["64", "128", "0", "64"])
    assert [float(r[4]) for r in rows][:2] == pytest.approx([64 * 1536 / 768**2, 128 * 1536 / 768**2], abs=1e-3)


def test_the_qlora_loading_settings(monkeypatch):
    """What fedlora asks transformers for (bitsandbytes itself needs CUDA: stood in for here):
    NF4 with double quantization and bf16 products, the whole model on the run's GPU; the
    classifier head kept in full precision, a causal LM left to transformers' own skips."""
    import sys
    import types

    from fedlora.models.hub import ModelError, quantized_loading

    with pytest.raises(ModelError, match="needs a CUDA GPU"):
        quantized_loading("4bit", torch.device("cpu"), torch.bfloat16)
    assert quantized_loading("none", torch.device("cpu"), None) == {}
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    causal = quantized_loading("4bit", torch.device("cuda", 0), torch.bfloat16)
    q = causal["quantization_config"]
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == (True, "nf4", True, torch.bfloat16)
    assert q.llm_int8_skip_modules is None and causal["device_map"] == {"": 0}
    head = quantized_loading("4bit", torch.device("cuda", 0), torch.bfloat16, classifier=True)["quantization_config"]
    assert head.llm_int8_skip_modules == ["classifier", "score"]
    eight = quantized_loading("8bit", torch.device("cuda", 1), None)
    assert eight["quantization_config"].load_in_8bit and eight["device_map"] == {"": 1}


@pytest.mark.parametrize("causal", [False, True], ids=["classifier", "causal-lm"])
def test_a_bf16_checkpoint_loads_in_float32(tmp_path, causal):
    """transformers 5 loads a checkpoint saved in bf16 as bf16; the base W0 that exact methods fold
    ΔW0 into would then round a 1e-4 delta by ~20%. fedlora loads unquantized bases in float32: the
    same values (bf16 → float32 is exact), and a small delta folds exactly (float32 reference)."""
    from fedlora.models.hub import load_causal_lm, load_pretrained, tiny_causal_lm, tiny_model

    model, tok = tiny_causal_lm() if causal else tiny_model("bert")
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = load_causal_lm(str(tmp_path / "m"))[0] if causal else load_pretrained(str(tmp_path / "m"), 2)[0]
    weights = dict(loaded.state_dict())
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
    name = next(k for k, v in saved.items() if v.dim() == 2 and "embed" not in k and k in weights)
    assert torch.equal(weights[name], saved[name].float())
    delta = 1e-4 * torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(weights[name] + delta - weights[name], delta, rtol=1e-2, atol=0)
