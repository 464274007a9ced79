"""Errors raised on bad input. Each names the client and module at fault."""

from __future__ import annotations

__all__ = ["AggregationError", "UpdateError", "RoundFailed"]


class AggregationError(ValueError):
    """A round cannot be aggregated (no clients, zero total weight, unknown method, …)."""


class UpdateError(AggregationError):
    """One client's update is malformed. ``client`` and ``module`` say where."""

    def __init__(self, client: str, module: str | None, problem: str):
        self.client = client
        self.module = module
        where = f"client {client!r}" + (f", module {module!r}" if module is not None else "")
        super().__init__(f"{where}: {problem}")


class RoundFailed(RuntimeError):
    """No sampled client finished a round: there is nothing to aggregate (raised by the engines)."""
