"""Errors raised by the data layer on bad input (files, tasks, partition settings)."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Data cannot be loaded, partitioned or scored. The message says what and where."""
