"""``fedlora merge``: a finished run's global model as one standalone Hugging Face folder.

The run's exported adapter (``<run>/adapter``, ``models/export.py``) holds the whole global update on
the pretrained base, so W = W0 + ΔW for every adapted module is peft's ``merge_and_unload`` of it, and
the trained head comes with it. The folder (weights, config, tokenizer) loads with
``AutoModelForSequenceClassification`` or ``AutoModelForCausalLM.from_pretrained`` alone, without peft
or fedlora, and serves as another run's ``model.name``: intermediate training (fine-tune on one task,
merge, fine-tune the merged model on the next) is two runs and a merge. A bi-encoder run
(``model.pair_encoder: siamese``) writes its merged encoder (``AutoModel``) and the two-number cosine
head beside it (``siamese_head.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError
from ..models import load_causal_lm
from ..models.hub import load_pretrained
from ..models.lora import HEAD_MODULES
from ..models.siamese import SIAMESE_HEAD, SiameseClassifier, as_siamese
from .generate import finished_run_config

__all__ = ["merge_run"]


def _head_rows(adapter: Path) -> int:
    """Rows of the exported head's output layer (= num_labels; 1 for regression): the head weight with
    the fewest rows (RoBERTa's head is dense + out_proj)."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        rows = [f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(".weight") and "lora_" not in k and set(k.split(".")) & set(HEAD_MODULES)]
    if not rows:
        raise ConfigError(f"{adapter} holds no classification head ('classifier' or 'score'): not a classifier run's export")
    return min(rows)


try:
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # pragma: no cover - an older safetensors
    _SafetensorError = OSError  # type: ignore[misc,assignment]


def merge_run(run_dir: str | Path, out: str | Path) -> Path:
    """Write ``run_dir``'s global model, merged, to the folder ``out`` (which must not exist yet)."""

    run_dir, out = Path(run_dir), Path(out)
    cfg = finished_run_config(run_dir)
    if out.exists():
        raise ConfigError(f"{out} exists; merge writes a new folder")
    if cfg.model.quantization != "none":
        raise ConfigError(
            f"{run_dir} trained on a {cfg.model.quantization} base: merging into it would round the update; merge into the full-precision base by hand"
        )
    adapter = run_dir / "adapter"
    try:
        return _merge(cfg, adapter, out)
    except (OSError, ValueError, _SafetensorError) as e:  # a truncated or missing adapter file, unreadable JSON
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(
            f"{adapter} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); run `fedlora run` on the finished run again to re-export it"
        ) from None


def _merge(cfg, adapter: Path, out: Path) -> Path:
    from peft import PeftModel

    pooler = None
    if cfg.data.task == "instruct" or cfg.data.as_prompt:
        base, tokenizer = load_causal_lm(cfg.model.name)
    else:
        rows = _head_rows(adapter)
        base, tokenizer = load_pretrained(cfg.model.name, rows, regression=rows == 1)
        if cfg.model.pair_encoder == "siamese":
            pooler = getattr(base.base_model, "pooler", None)  # as_siamese drops it; the saved encoder keeps it
            base = as_siamese(base, tokenizer)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    if isinstance(merged, SiameseClassifier):
        _save_siamese(merged, out, pooler)
    else:
        merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _save_siamese(model: SiameseClassifier, out: Path, pooler) -> None:
    """A bi-encoder run's merged model: the encoder as a plain transformers folder (``AutoModel``
    loads it, with the pretrained ``pooler`` the bi-encoder never read, so no weight is missing;
    mean-pooled, it is the fine-tuned sentence encoder, as sentence-transformers reads it) and the
    cosine head beside it in ``siamese_head.json`` (logits = weight·cos(u, v) + bias)."""
    if pooler is not None:
        model.encoder.pooler = pooler
    model.encoder.save_pretrained(out)
    head = {"weight": model.classifier.weight.detach().reshape(-1).tolist(), "bias": model.classifier.bias.detach().tolist()}
    (out / SIAMESE_HEAD).write_text(json.dumps(head, indent=1) + "\n")
