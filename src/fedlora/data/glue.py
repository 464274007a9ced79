"""Load a GLUE split as a `TextDataset`, from a local GLUE download or the HF hub.

Sources: ``local`` reads ``data_dir``; ``hub`` loads ``nyu-mll/glue`` (`glue_hub`);
``auto`` reads the local copy when the task's folder ``<data_dir>/<TASK>`` exists and
falls back to the hub otherwise, so a config works on a machine without the copy
whenever it is online. A task folder that exists but lacks a file is an error, never a
silent switch to the hub.

Local layout (what GLUE's ``download_glue_data.py`` writes)::

    <data_dir>/CoLA/{train,dev}.tsv     no header: source, label, original label, sentence
    <data_dir>/SST-2/{train,dev}.tsv    sentence, label
    <data_dir>/MRPC/{train,dev}.tsv     Quality, #1 ID, #2 ID, #1 String, #2 String
    <data_dir>/STS-B/{train,dev}.tsv    index, genre, ..., sentence1, sentence2, score
    <data_dir>/QQP/{train,dev}.tsv      id, qid1, qid2, question1, question2, is_duplicate
    <data_dir>/MNLI/{train,dev_matched,dev_mismatched}.tsv   ..., sentence1, sentence2, ..., gold_label
    <data_dir>/QNLI/{train,dev}.tsv     index, question, sentence, label
    <data_dir>/RTE|WNLI/{train,dev}.tsv index, sentence1, sentence2, label

Rows are split on tabs with no quote processing (GLUE rows contain unbalanced ``"``), and
every row is checked: a wrong column count, an unknown or unparseable label or an empty
text raises `DataError` naming the file and line (``strict=False`` skips such rows with a
warning instead — the original QQP and MNLI releases have a few).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, reading
from .glue_hub import HUB_DATASET, HubUnavailable, load_hub
from .tasks import TaskSpec, get_task
from .text import TextDataset

__all__ = ["load_glue", "glue_path"]


@dataclass(frozen=True)
class _Layout:
    """Where texts and label sit in one task's TSV, and how the label is written."""

    text: tuple[str | int, ...]  # header names, or column indices when there is no header
    label: str | int
    label_kind: str  # "int" (class id), "name" (class name) or "float" (score)
    header: bool = True
    num_columns: int | None = None  # only for header-less files


_LAYOUTS = {
    "CoLA": _Layout((3,), 1, "int", header=False, num_columns=4),
    "SST-2": _Layout(("sentence",), "label", "int"),
    "MRPC": _Layout(("#1 String", "#2 String"), "Quality", "int"),
    "STS-B": _Layout(("sentence1", "sentence2"), "score", "float"),
    "QQP": _Layout(("question1", "question2"), "is_duplicate", "int"),
    "MNLI": _Layout(("sentence1", "sentence2"), "gold_label", "name"),
    "QNLI": _Layout(("question", "sentence"), "label", "name"),
    "RTE": _Layout(("sentence1", "sentence2"), "label", "name"),
    "WNLI": _Layout(("sentence1", "sentence2"), "label", "int"),
}

_SPLITS = {"train": "train", "dev": "dev", "validation": "dev", "val": "dev"}


def _split_name(split: str) -> str:
    key = str(split).lower()
    if key == "test":
        raise DataError("GLUE test splits carry no labels; use 'train' or 'dev'")
    if key not in _SPLITS:
        raise DataError(f"unknown split {split!r}; use 'train' or 'dev'")
    return _SPLITS[key]


def glue_path(task: str | TaskSpec, split: str, data_dir: str | os.PathLike) -> Path:
    """The TSV file that holds ``split`` of ``task`` under ``data_dir``."""
    spec = get_task(task)
    name = spec.train_file if _split_name(split) == "train" else spec.dev_file
    return Path(data_dir) / spec.local_dir / name


def load_glue(
    task: str | TaskSpec,
    split: str,
    *,
    source: str = "local",
    data_dir: str | os.PathLike | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    strict: bool = True,
) -> TextDataset:
    """Load ``split`` ("train" or "dev") of a GLUE ``task`` as a `TextDataset`.

    ``source="local"`` reads ``data_dir`` (default: ``$FEDLORA_GLUE_DIR``, then
    ``$GLUE_DIR``); ``source="hub"`` calls ``datasets.load_dataset("nyu-mll/glue", ...)``;
    ``source="auto"`` reads ``data_dir`` when ``<data_dir>/<TASK>`` exists, else the hub,
    and raises one `DataError` naming the folder it looked for when the hub fails too.
    ``max_examples`` keeps a random subset of that size (chosen with ``seed``, kept in
    file order). Label ids are the task's ``label_names`` order in every case.
    """
    spec = get_task(task)
    split = _split_name(split)
    if source not in ("local", "hub", "auto"):
        raise DataError(f"unknown data source {source!r}; use 'auto', 'local' or 'hub'")
    data_dir = data_dir or os.environ.get("FEDLORA_GLUE_DIR") or os.environ.get("GLUE_DIR")
    if source == "auto" and not (data_dir and (Path(data_dir) / spec.local_dir).is_dir()):
        ds = _load_auto_hub(spec, split, data_dir)
    elif source in ("local", "auto"):
        if not data_dir:
            raise DataError("load_glue(source='local') needs data_dir (or $FEDLORA_GLUE_DIR / $GLUE_DIR) pointing at a GLUE download")
        ds = _read_tsv(glue_path(spec, split, data_dir), spec, strict=strict)
    else:
        try:
            ds = load_hub(spec, split)
        except HubUnavailable as e:
            hub_split = spec.hub_train_split if split == "train" else spec.hub_dev_split
            raise DataError(
                f"could not load {HUB_DATASET} config {spec.hub_config!r} split {hub_split!r} from "
                f"the Hugging Face hub (unreachable?): {e}; use source: local with data_dir pointing "
                f"at a GLUE download (<data_dir>/{_local_file(spec, split)})"
            ) from e
    return take_random(ds, max_examples, seed)


def _local_file(spec: TaskSpec, split: str) -> str:
    return f"{spec.local_dir}/{spec.train_file if split == 'train' else spec.dev_file}"


def _load_auto_hub(spec: TaskSpec, split: str, data_dir: str | os.PathLike | None) -> TextDataset:
    """The hub, for ``auto`` without a local copy; its failure becomes one error that says
    where the local copy was looked for, why the hub failed and how to fix either."""
    try:
        return load_hub(spec, split, probe=True)
    except HubUnavailable as e:
        where = f"at {Path(data_dir) / spec.local_dir}" if data_dir else "(data.data_dir is empty)"
        raise DataError(
            f"data.source auto: no local copy of {spec.local_dir} {where} and the Hugging Face hub "
            f"is unreachable ({e}); point data.data_dir at a GLUE copy "
            f"(<data_dir>/{_local_file(spec, split)}) or go online"
        ) from e


def take_random(ds, max_examples: int | None, seed: int):
    """A random subset of ``max_examples`` examples (chosen with ``seed``), kept in file order; all when None or larger."""
    if max_examples is None or max_examples >= len(ds):
        return ds
    if max_examples < 1:
        raise DataError(f"max_examples must be at least 1, got {max_examples}")
    idx = np.random.default_rng(seed).choice(len(ds), size=max_examples, replace=False)
    return ds.subset(np.sort(idx))


def _read_tsv(path: Path, spec: TaskSpec, *, strict: bool) -> TextDataset:
    layout = _LAYOUTS[spec.local_dir]
    if not path.is_file():
        raise DataError(f"GLUE file not found: {path} (task {spec.name}; expected the download_glue_data.py layout <data_dir>/{spec.local_dir}/<split>.tsv)")
    texts: list[list[str]] = [[] for _ in layout.text]
    labels: list[float | int] = []
    skipped: list[str] = []
    # newline="\n": only \n ends a row (a stray \r inside a text stays in the text);
    # utf-8-sig drops the byte-order mark that MRPC's header carries.
    with reading(path), open(path, encoding="utf-8-sig", newline="\n") as f:
        lines = enumerate(f, start=1)
        if layout.header:
            try:
                _, first = next(lines)
            except StopIteration:
                raise DataError(f"{path}: empty file (expected a header row)") from None
            header = first.rstrip("\r\n").split("\t")
            try:
                cols = [header.index(c) for c in (*layout.text, layout.label)]
            except ValueError:
                raise DataError(f"{path}:1: header {header} lacks one of the columns {[*layout.text, layout.label]} of task {spec.name}") from None
            ncols = len(header)
        else:
            cols, ncols = [*layout.text, layout.label], layout.num_columns
        for lineno, line in lines:
            line = line.rstrip("\r\n")
            if not line:
                continue
            try:
                row = _parse_row(line, ncols, cols, layout, spec)
            except ValueError as e:
                msg = f"{path}:{lineno}: {e}"
                if strict:
                    # No config key reaches `strict` (a run reads every row): what a user of the
                    # command line can do is repair the file; Python callers may skip such rows.
                    raise DataError(msg + "; fix or delete that row (from Python, load_glue(..., strict=False) skips malformed rows)") from None
                skipped.append(msg)
                continue
            for bucket, text in zip(texts, row[:-1]):
                bucket.append(text)
            labels.append(row[-1])
    if skipped:
        warnings.warn(f"skipped {len(skipped)} malformed row(s) in {path}; first: {skipped[0]}", stacklevel=3)
    if not labels:
        raise DataError(f"{path}: no examples")
    dtype = np.float32 if spec.is_regression else np.int64
    return TextDataset(
        texts[0], texts[1] if len(texts) > 1 else None, np.asarray(labels, dtype=dtype), None if spec.label_names is None else list(spec.label_names)
    )


def _parse_row(line: str, ncols: int, cols: list[int], layout: _Layout, spec: TaskSpec):
    """Texts then label of one row; ValueError (with a short reason) if malformed."""
    fields = line.split("\t")
    if len(fields) != ncols:
        raise ValueError(f"expected {ncols} tab-separated columns, found {len(fields)}")
    *texts, raw = (fields[c] for c in cols)
    for t in texts:
        if not t.strip():
            raise ValueError("empty text")
    return (*texts, _parse_label(raw.strip(), layout.label_kind, spec))


def _parse_label(raw: str, kind: str, spec: TaskSpec) -> int | float:
    if kind == "float":
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"label {raw!r} is not a number") from None
        if not np.isfinite(value):
            raise ValueError(f"label {raw!r} is not finite")
        return value
    names = spec.label_names
    if kind == "name":
        if raw not in names:
            raise ValueError(f"unknown label {raw!r}; expected one of {list(names)}")
        return names.index(raw)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"label {raw!r} is not an integer") from None
    if not 0 <= value < len(names):
        raise ValueError(f"label {value} out of range 0..{len(names) - 1}")
    return value
