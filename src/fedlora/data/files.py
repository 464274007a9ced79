"""Load a user's own CSV (header row) or JSONL (one object per line) file as a `TextDataset`.

Labels: with ``regression=True`` every label is parsed as a float. Otherwise, with
``label_names`` a label may be a name from that list or an integer id into it; without
``label_names`` labels must be integer ids 0 ≤ id < 2**31 (string labels need ``label_names``,
so that train and dev files agree on the ids).

Texts must be strings: a JSON number, list, object or null in a text column is refused, not
written out as its Python repr. A CSV header that names a column twice is refused (which
one would be read is a guess).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import DataError, reading
from .text import TextDataset

__all__ = ["load_text_file"]


def load_text_file(
    path: str | os.PathLike,
    text_columns: str | Sequence[str],
    label_column: str,
    *,
    label_names: Sequence[str] | None = None,
    regression: bool = False,
    max_id: int | None = None,
) -> TextDataset:
    """Read ``path`` (``.csv`` or ``.jsonl``/``.json``/``.ndjson``) into a `TextDataset`.

    ``max_id``: integer labels without ``label_names`` must be ≤ it (an evaluation file's ids
    must be classes of the training file's); DataError naming the line otherwise."""
    path = Path(path)
    cols = [text_columns] if isinstance(text_columns, str) else list(text_columns)
    if not 1 <= len(cols) <= 2:
        raise DataError(f"text_columns must name one or two columns, got {cols}")
    if regression and (label_names is not None or max_id is not None):
        raise DataError("label_names and max_id make no sense with regression=True")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = csv_rows(path)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        rows = jsonl_rows(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv or .jsonl")

    names = None if label_names is None else [str(n) for n in label_names]
    texts: list[list[str]] = [[] for _ in cols]
    labels: list[int | float] = []
    for lineno, row in rows:
        missing = [c for c in (*cols, label_column) if c not in row]
        if missing:
            raise DataError(f"{path}:{lineno}: missing column(s) {missing}; columns found: {list(row)}")
        for bucket, c in zip(texts, cols):
            value = row[c]
            if not isinstance(value, str):  # only JSON gives other types; their repr is no text
                raise DataError(f"{path}:{lineno}: column {c!r} holds {_json_type(value)}, not a text string")
            if not value.strip():
                raise DataError(f"{path}:{lineno}: empty text in column {c!r}")
            bucket.append(value)
        try:
            labels.append(_label(row[label_column], names, regression))
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        if max_id is not None and names is None and labels[-1] > max_id:
            raise DataError(f"{path}:{lineno}: label {labels[-1]} is no class of the training data, whose label ids are 0..{max_id}")
    if not labels:
        raise DataError(f"{path}: empty file (no examples)")
    return TextDataset(texts[0], texts[1] if len(cols) == 2 else None, np.asarray(labels, dtype=np.float32 if regression else np.int64), names)


def csv_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for every row of a CSV file with a header; DataError naming the line otherwise."""
    with reading(path), open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty file (no header row)")
        # DictReader keeps the last of two same-named columns; which one was meant is a guess.
        # Unnamed columns ("a,b,,") are never read by name, so only named ones count.
        twice = sorted({c for c in reader.fieldnames if c and reader.fieldnames.count(c) > 1})
        if twice:
            raise DataError(f"{path}:{reader.line_num}: the header names column(s) {twice} more than once; rename them so each column has its own name")
        rows = []
        for row in reader:
            if None in row:  # more fields than header names
                raise DataError(f"{path}:{reader.line_num}: more fields than the header's {len(reader.fieldnames)} columns {reader.fieldnames}")
            if any(v is None for v in row.values()):  # fewer fields than header names
                raise DataError(f"{path}:{reader.line_num}: fewer fields than the header's {len(reader.fieldnames)} columns {reader.fieldnames}")
            rows.append((reader.line_num, row))
    return rows


def jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file; DataError naming the line otherwise."""
    rows = []
    with reading(path), open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    return rows


_MAX_ID = 2**31  # class ids beyond this are no class count anyone trains a head for (and overflow int64 past 2**63)


def _json_type(value) -> str:
    """How a JSON value reads in an error message: 'null', 'a number', 'a list', …"""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _label(raw, names: list[str] | None, regression: bool) -> int | float:
    if isinstance(raw, str):
        raw = raw.strip()
    if raw is None or raw == "":
        raise ValueError("empty label")
    if regression:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"label {raw!r} is not a number") from None
        if not np.isfinite(value):
            raise ValueError(f"label {raw!r} is not finite")
        return value
    if names is not None and str(raw) in names:
        return names.index(str(raw))
    if isinstance(raw, bool) or isinstance(raw, float) and not raw.is_integer():
        value = None
    else:
        try:
            value = int(raw)
        except (TypeError, ValueError):
            value = None
    if value is not None and names is None and value >= _MAX_ID:
        raise ValueError(f"label {raw!r} is too large for a class id (ids are 0 ≤ id < 2**31; pass label_names for other labels)")
    if value is None or value < 0 or (names is not None and value >= len(names)):
        known = f"one of {names} or an id 0..{len(names) - 1}" if names is not None else "a non-negative integer class id (pass label_names for string labels)"
        raise ValueError(f"unknown label {raw!r}; expected {known}")
    return value
