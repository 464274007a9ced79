"""One module per aggregation method; importing this package registers them all."""

from typing import Any

from ..aggregator import Aggregator
from ..registry import lookup, names
from . import fedex, fedhl, fedit, fedsa, fedsb, fedsvd, ffa, flexlora, flora, fra, hetlora, hexa, rolora  # noqa: F401  (each registers itself)

__all__ = ["available_methods", "get_aggregator"]


def available_methods() -> list[str]:
    return names()


def get_aggregator(name: str, **options: Any) -> Aggregator:
    """An aggregator by registry name, e.g. ``get_aggregator("hexa", drift_beta=1.0)``."""
    return lookup(name, **options)
