"""Load a user's own CSV (header row) or JSONL (one object per line) file as a `TextDataset`.

Labels: with ``regression=True`` every label is parsed as a float. Otherwise, with
``label_names`` a label may be a name from that list or an integer id into it; without
``label_names`` labels must be non-negative integers (string labels need ``label_names``,
so that train and dev files agree on the ids).
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
    path: str | os.PathLike, text_columns: str | Sequence[str], label_column: str, *, label_names: Sequence[str] | None = None, regression: bool = False
) -> TextDataset:
    """Read ``path`` (``.csv`` or ``.jsonl``/``.json``/``.ndjson``) into a `TextDataset`."""
    path = Path(path)
    cols = [text_columns] if isinstance(text_columns, str) else list(text_columns)
    if not 1 <= len(cols) <= 2:
        raise DataError(f"text_columns must name one or two columns, got {cols}")
    if regression and label_names is not None:
        raise DataError("label_names make no sense with regression=True")
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
            if value is None or not str(value).strip():
                raise DataError(f"{path}:{lineno}: empty text in column {c!r}")
            bucket.append(str(value))
        try:
            labels.append(_label(row[label_column], names, regression))
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
    if not labels:
        raise DataError(f"{path}: empty file (no examples)")
    return TextDataset(texts[0], texts[1] if len(cols) == 2 else None, np.asarray(labels, dtype=np.float32 if regression else np.int64), names)


def csv_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for every row of a CSV file with a header; DataError naming the line otherwise."""
    with reading(path), open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty file (no header row)")
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
    if value is None or value < 0 or (names is not None and value >= len(names)):
        known = f"one of {names} or an id 0..{len(names) - 1}" if names is not None else "a non-negative integer class id (pass label_names for string labels)"
        raise ValueError(f"unknown label {raw!r}; expected {known}")
    return value
