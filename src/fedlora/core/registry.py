"""Methods by name. ``core/methods/*`` register themselves on import; nothing here
imports them, so there is no import circle: ``core.methods`` imports this module and
``aggregator``, and ``get_aggregator`` (in ``core.methods``) looks names up once every
method module is loaded.

Methods of your own, without touching fedlora (an :class:`Aggregator` subclass with ``name``,
``exact`` and ``_aggregate``):

* ``package.module:ClassName`` — imported from anything on the Python path;
* ``path/to/file.py:ClassName`` — loaded from that file;
* a name registered by an installed package under the entry-point group ``fedlora.methods``
  (``[project.entry-points."fedlora.methods"] mymethod = "mypkg.methods:MyMethod"``).
"""

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
    """An instance of the method ``name`` (registered, ``module:Class``, ``file.py:Class`` or
    an entry point) with ``options``."""
    cls = _REGISTRY.get(name) or _plugin(name)
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:  # unknown keyword, or a value the method's constructor refuses
        raise AggregationError(f"bad options for method {name!r}: {e}") from None


def names() -> list[str]:
    """Built-in methods and the installed packages' entry points."""
    return sorted(set(_REGISTRY) | {ep.name for ep in _entry_points()})


def _entry_points():
    from importlib.metadata import entry_points

    return entry_points(group="fedlora.methods")


def _plugin(spec: str) -> type[Aggregator]:
    """The Aggregator class ``spec`` names: ``module:Class``, ``file.py:Class`` or an entry point."""
    import importlib
    import importlib.util
    from pathlib import Path

    found = [ep for ep in _entry_points() if ep.name == spec]
    try:
        if found:
            obj = found[0].load()
        elif ":" in spec:
            where, _, attr = spec.rpartition(":")
            if where.endswith(".py"):
                path = Path(where).expanduser()
                if not path.is_file():
                    raise AggregationError(f"method {spec!r}: file {str(path)!r} does not exist")
                module_spec = importlib.util.spec_from_file_location(f"fedlora_plugin_{path.stem}", path)
                assert module_spec is not None and module_spec.loader is not None
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
            else:
                module = importlib.import_module(where)
            obj = getattr(module, attr)
        else:
            raise AggregationError(
                f"unknown aggregation method {spec!r}; known methods: {', '.join(names())} (or your own as package.module:Class or file.py:Class)"
            )
    except (ImportError, AttributeError, SyntaxError) as e:
        raise AggregationError(f"cannot load method {spec!r}: {type(e).__name__}: {e}") from None
    if not (isinstance(obj, type) and issubclass(obj, Aggregator)):
        raise AggregationError(f"method {spec!r} is {obj!r}, not a subclass of fedlora.core.Aggregator")
    for attr in ("name", "exact"):
        if not hasattr(obj, attr):
            raise AggregationError(f"method {spec!r} must set the class attribute {attr!r}")
    return obj
