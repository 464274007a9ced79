"""Methods by name. ``core/methods/*`` register themselves on import; nothing here
imports them, so there is no import circle: ``core.methods`` imports this module and
``aggregator``, and ``get_aggregator`` (in ``core.methods``) looks names up once every
method module is loaded."""

from __future__ import annotations

from typing import Any

from .aggregator import Aggregator
from .errors import AggregationError

__all__ = ["register", "lookup"]

_REGISTRY: dict[str, type[Aggregator]] = {}


def register(cls: type[Aggregator]) -> type[Aggregator]:
    """Class decorator: make a method available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def lookup(name: str, **options: Any) -> Aggregator:
    """An instance of the registered method ``name`` with ``options``."""
    if name not in _REGISTRY:
        raise AggregationError(f"unknown aggregation method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**options)
    except (TypeError, ValueError) as e:  # unknown keyword, or a value the method's constructor refuses
        raise AggregationError(f"bad options for method {name!r}: {e}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)
