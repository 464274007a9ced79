"""Errors raised by the data layer on bad input (files, tasks, partition settings)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DataError", "reading"]


class DataError(ValueError):
    """Data cannot be loaded, partitioned or scored. The message says what and where."""


@contextmanager
def reading(path) -> Iterator[None]:
    """Errors of decoding a text file (not UTF-8, a NUL byte, a field beyond the csv limit) as a
    DataError naming the file, instead of a traceback from the codec or the csv module."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.object[e.start : e.start + 1].hex()} at offset {e.start}); save the file as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}: cannot be read as CSV ({e})") from None
