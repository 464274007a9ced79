"""Thin model layer: Hugging Face models with peft LoRA, seen by the engines as
named (B, A) adapters and dense head parameters."""

from .hub import ModelError, load_pretrained, resolve_model, tiny_model
from .lora import FedModel, LoraSettings

__all__ = ["ModelError", "load_pretrained", "resolve_model", "tiny_model", "FedModel", "LoraSettings"]
