"""Export the final global model as a peft adapter on the *pretrained* base.

Methods that fold into W0 (fedex, hexa, flora) leave part of the global update
in the base weights, so the rank-r adapter alone is not the model. The
exported adapter holds the whole update relative to the pretrained weights,
Σ_t ΔW0_t + G, from its factors: its thin SVD (through QR, no dense matrix)
gives B = U·Σ, A = Vᵀ at each module's numerical rank, saved with peft's
``rank_pattern``/``alpha_pattern`` (α = r, so scaling 1) and the trained head
as ``modules_to_save``. ``PeftModel.from_pretrained(base, folder)`` then
reproduces the global model.

The smaller exact form, per module: rank-k factors cost k·(m+n) numbers, the module's merged
weight W0 + ΔW costs m·n. Where k·(m+n) ≥ m·n (the folded history of many rounds has passed
rank m·n/(m+n)), the module is exported as a peft ``modules_to_save`` copy holding the merged
weight instead of a LoRA pair: the same model, fewer numbers, still one folder that
``PeftModel.from_pretrained`` loads.

``rank_limit`` > 0 exports each module's best rank-≤``rank_limit`` approximation instead (the
truncated SVD, Eckart–Young); the relative error it leaves, ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F over all
modules together, is computed from the dropped singular values and reported.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..core import SVD, Factored
from .hub import load_base
from .lora import FedModel
from .siamese import SiameseClassifier

__all__ = ["export_peft_adapter", "ExportReport"]


@contextmanager
def quiet_peft() -> Iterator[None]:
    """peft reads ``model.is_gradient_checkpointing``, deprecated in transformers 5 with a
    FutureWarning on every run: peft's to fix, not the user's. Ignore that warning, and
    only that one, while fedlora calls peft."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        # A base loaded from a GGUF file (smollm2) has no config.json beside it; its vocabulary is the file's.
        warnings.filterwarnings("ignore", message=r"Could not find a config file in .* will assume that the vocabulary was not modified", category=UserWarning)
        yield


@dataclass
class ExportReport:
    ranks: dict[str, int]  # LoRA rank per module exported as factors
    merged: list[str] = field(default_factory=list)  # modules exported as their merged weight W0 + ΔW
    numbers: int = 0  # adapter numbers for the target modules (factors, or m·n for merged ones)
    rel_error: float = 0.0  # ‖ΔW − ΔW_exported‖_F / ‖ΔW‖_F over all modules (0 unless rank_limit)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "adapter_max_rank": max(self.ranks.values(), default=0),
            "export_merged_modules": len(self.merged),
            "export_numbers": self.numbers,
            "export_rel_error": self.rel_error,
        }


@torch.no_grad()
def export_peft_adapter(
    fm: FedModel,
    total_delta: Mapping[str, Factored],
    dense: Mapping[str, Tensor],
    model_path: str,
    num_labels: int,
    regression: bool,
    out_dir: Path,
    rtol: float = 1e-6,
    *,
    causal: bool = False,
    rank_limit: int = 0,
) -> ExportReport:
    """Write ``out_dir`` (adapter_config.json + adapter_model.safetensors)."""
    from peft import LoraConfig, get_peft_model

    factors: dict[str, tuple[Tensor, Tensor]] = {}
    merged: dict[str, SVD] = {}
    total_sq, dropped_sq, numbers = 0.0, 0.0, 0
    for name, delta in total_delta.items():
        m, n = delta.shape
        svd = delta.svd(rtol=rtol)
        energy = svd.S.double().square()
        total_sq += float(energy.sum())
        if 0 < rank_limit < svd.rank:
            dropped_sq += float(energy[rank_limit:].sum())
            svd = svd.truncate(rank_limit)
        if svd.rank * (m + n) >= m * n:
            merged[name], numbers = svd, numbers + m * n
        elif svd.rank == 0:  # an untouched module still needs a (zero) rank-1 adapter
            factors[name], numbers = (torch.zeros(m, 1), torch.zeros(1, n)), numbers + m + n
        else:
            factors[name], numbers = (svd.U * svd.S, svd.Vh), numbers + svd.rank * (m + n)
    if not factors:  # peft needs one LoRA target: the lowest-rank module stays factored (exact either way)
        name = min(merged, key=lambda k: merged[k].rank)
        svd = merged.pop(name)  # its SVD is kept: nothing is recomputed
        (m, n), k = total_delta[name].shape, svd.rank
        factors[name], numbers = (svd.U * svd.S, svd.Vh), numbers - m * n + k * (m + n)
    ranks = {name: B.shape[1] for name, (B, _) in factors.items()}
    base = load_base(model_path, num_labels, regression, causal, "siamese" if isinstance(fm.base, SiameseClassifier) else "cross")
    # each dense key's module: the output layer, or a module the checkpoint lacked (fm.head_modules)
    owner = {k: max((m for m in fm.head_modules if k.startswith(m + ".")), key=len) for k in dense}
    heads = sorted(set(owner.values()))
    top = max(ranks.values())
    config = LoraConfig(
        task_type="CAUSAL_LM" if causal else "SEQ_CLS",
        r=top,
        lora_alpha=top,
        # by full name: a merged module must not also be a LoRA target, nor may a head module (a target name
        # such as `dense` also names RoBERTa's classifier.dense, which travels whole in modules_to_save)
        target_modules=sorted(factors),
        rank_pattern={re.escape(n): r for n, r in ranks.items()},
        alpha_pattern={re.escape(n): r for n, r in ranks.items()},
        modules_to_save=(heads + sorted(merged)) or None,
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in fm.layers.values()),  # GPT-2's Conv1D
    )
    with quiet_peft():
        peft = get_peft_model(base, config)
    modules = dict(peft.base_model.model.named_modules())
    for name, (B, A) in factors.items():
        layer = modules[name]
        layer.lora_B["default"].weight.copy_(B)
        layer.lora_A["default"].weight.copy_(A)
        assert abs(layer.scaling["default"] - 1.0) < 1e-9, layer.scaling
    for name, svd in merged.items():
        copy = modules[name].modules_to_save["default"]
        d = svd.factored().dense().to(copy.weight.dtype)
        copy.weight.add_(d.T if fm.layers[name].fan_in_fan_out else d)  # Conv1D stores W as (in, out)
    params = dict(peft.base_model.model.named_parameters())
    for key, value in dense.items():
        head = owner[key]
        params[f"{head}.modules_to_save.default.{key[len(head) + 1 :]}"].copy_(value)
    with quiet_peft():
        peft.save_pretrained(str(out_dir))
    rel = (dropped_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0
    return ExportReport(ranks=ranks, merged=sorted(merged), numbers=numbers, rel_error=rel)
