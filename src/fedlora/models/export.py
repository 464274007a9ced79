"""Export the final global model as a peft adapter on the *pretrained* base.

Methods that fold into W0 (fedex, hexa, flora) leave part of the global update
in the base weights, so the rank-r adapter alone is not the model. The
exported adapter holds the whole update relative to the pretrained weights,
Σ_t ΔW0_t + G, from its factors: its thin SVD (through QR, no dense matrix)
gives B = U·Σ, A = Vᵀ at each module's numerical rank, saved with peft's
``rank_pattern``/``alpha_pattern`` (α = r, so scaling 1) and the trained head
as ``modules_to_save``. ``PeftModel.from_pretrained(base, folder)`` then
reproduces the global model.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from ..core import Factored
from .hub import load_causal_lm, load_pretrained
from .lora import HEAD_MODULES, FedModel

__all__ = ["export_peft_adapter"]


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
) -> dict[str, int]:
    """Write ``out_dir`` (adapter_config.json + adapter_model.safetensors); returns rank per module."""
    from peft import LoraConfig, get_peft_model

    factors, ranks = {}, {}
    for name, delta in total_delta.items():
        svd = delta.svd(rtol=rtol)
        if svd.rank == 0:  # an untouched module still needs a (zero) rank-1 adapter
            m, n = delta.shape
            B, A = torch.zeros(m, 1), torch.zeros(1, n)
        else:
            B, A = svd.U * svd.S, svd.Vh
        factors[name], ranks[name] = (B, A), B.shape[1]
    base = load_causal_lm(model_path)[0] if causal else load_pretrained(model_path, num_labels, regression)[0]
    heads = sorted({k.split(".")[0] for k in dense} & set(HEAD_MODULES))
    top = max(ranks.values())
    config = LoraConfig(
        task_type="CAUSAL_LM" if causal else "SEQ_CLS",
        r=top,
        lora_alpha=top,
        target_modules=list(fm.settings.target_modules),
        rank_pattern={re.escape(n): r for n, r in ranks.items()},
        alpha_pattern={re.escape(n): r for n, r in ranks.items()},
        modules_to_save=heads or None,
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
    params = dict(peft.base_model.model.named_parameters())
    for key, value in dense.items():
        head, rest = key.split(".", 1)
        params[f"{head}.modules_to_save.default.{rest}"].copy_(value)
    with quiet_peft():
        peft.save_pretrained(str(out_dir))
    return ranks
