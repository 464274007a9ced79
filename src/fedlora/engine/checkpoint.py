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
    """Plain tensors and numbers only (``weights_only``): a checkpoint cannot run code. One that
    cannot be read is refused, never replaced by a fresh start from round 0."""
    from ..config import ConfigError

    try:
        ckpt = torch.load(path, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, unsupported type, I/O error: all the same to the user
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ConfigError(
            f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {reason}): it is truncated or corrupted; "
            "restore it, or move the run folder away to start again from round 0"
        ) from None
    required = {"config", "state", "base", "rounds", "clients", "folded"}
    if not isinstance(ckpt, dict) or not required <= set(ckpt):
        raise ConfigError(f"checkpoint {str(path)!r} is not a fedlora checkpoint (it lacks {sorted(required - set(ckpt or {}))})")
    return ckpt
