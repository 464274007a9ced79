"""Every random draw of a run comes from (seed, round, purpose): client sampling,
batch order and dropout. A resumed run therefore replays exactly the draws an
uninterrupted run makes, with no RNG state to checkpoint. The exception is
``privacy.secure_noise``: DP's noise and sampling then come from the operating system's entropy
(:func:`secret_generator`), since draws anyone can regenerate from the config protect nobody."""

from __future__ import annotations

import zlib

import torch

__all__ = ["derive_seed", "generator", "secret_generator"]


def derive_seed(seed: int, *parts: object) -> int:
    return zlib.crc32("/".join(str(p) for p in (seed, *parts)).encode())


def generator(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from the operating system's entropy (63 bits): its draws
    cannot be regenerated from the run's configuration. torch's sampler is not a cryptographic one."""
    import secrets

    return torch.Generator(device=device).manual_seed(secrets.randbits(63))
