"""``fedlora generate``: answer prompts with a finished causal-LM run's exported adapter.

The adapter in ``<run>/adapter`` holds the whole global update on the pretrained
base (``models/export.py``), so the base model from the run's config plus that
adapter is the global model; prompts go through the same template as training
(the tokenizer's chat template, or fedlora's plain one) and are answered greedily.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, load_config
from ..data.instruct import render_prompt
from ..models import load_causal_lm
from ..models.device import resolve_placement
from ..models.hub import quantized_loading
from .evaluate import generate_answers

__all__ = ["generate_from_run", "finished_run_config"]


def finished_run_config(run_dir: Path):
    """The configuration of a finished run folder (one with config.yaml and its exported adapter/), or a ConfigError."""
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise ConfigError(f"{run_dir} is not a finished run folder (it needs config.yaml and adapter/)")
    return load_config(run_dir / "config.yaml")


def generate_from_run(run_dir: str | Path, prompts: list[str], max_new_tokens: int = 128) -> list[str]:
    from peft import PeftModel

    run_dir = Path(run_dir)
    cfg = finished_run_config(run_dir)
    if cfg.data.task != "instruct":
        raise ConfigError(f"{run_dir} fine-tuned a classifier (data.task={cfg.data.task!r}); fedlora generate needs a causal LM run (data.task=instruct)")
    place = resolve_placement(cfg.train.device, cfg.train.precision)
    loading = quantized_loading(cfg.model.quantization, place.device, place.dtype)
    base, tokenizer = load_causal_lm(cfg.model.name, loading)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    if not loading:  # a quantized base is placed as it loads
        model = model.to(place.device)
    ids = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    return generate_answers(model, tokenizer, ids, max_new_tokens, place)
