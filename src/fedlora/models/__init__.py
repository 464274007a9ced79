"""Thin model layer: Hugging Face models with peft LoRA, seen by the engines as
named (B, A) adapters and dense head parameters."""

from .hub import ModelError, default_target_modules, load_causal_lm, load_pretrained, resolve_model, tiny_causal_lm, tiny_model
from .lora import FedModel, LoraSettings
from .siamese import SiameseClassifier, as_siamese

__all__ = [
    "ModelError",
    "load_pretrained",
    "load_causal_lm",
    "default_target_modules",
    "resolve_model",
    "tiny_model",
    "tiny_causal_lm",
    "FedModel",
    "LoraSettings",
    "SiameseClassifier",
    "as_siamese",
]
