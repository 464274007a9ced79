"""Checkpoints of the server after every round, written atomically: a run
killed at any moment leaves the last complete round on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Plain tensors and numbers only (``weights_only``): a checkpoint cannot run code."""
    return torch.load(path, weights_only=True)
