"""Every random draw of a run comes from (seed, round, purpose): client sampling,
batch order and dropout. A resumed run therefore replays exactly the draws an
uninterrupted run makes, with no RNG state to checkpoint."""

from __future__ import annotations

import zlib

import torch

__all__ = ["derive_seed", "generator"]


def derive_seed(seed: int, *parts: object) -> int:
    return zlib.crc32("/".join(str(p) for p in (seed, *parts)).encode())


def generator(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))
