"""Shared set-up for the engine/CLI tests (tests/test_engine_*.py).

* ``tiny_models``: tiny random bert and gpt2 checkpoints, saved once per session into a
  temporary folder, loaded by the engine through ``model.name=<folder>`` like real models.
* ``GLUE``: the real local GLUE copy next to the repository.
* ``overrides(...)``: the small settings every engine test uses.

Expected values are never taken from the engine's own recorded outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"

_MODELS: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{"bert": folder, "gpt2": folder, "roberta": folder}: saved once per session (a module-level cache, so
    every test module that imports this fixture shares the same folders)."""
    if not _MODELS:
        from fedlora.models import tiny_model

        root = tmp_path_factory.mktemp("tiny-models")
        for arch in ("bert", "gpt2", "roberta"):
            model, tok = tiny_model(arch)
            model.save_pretrained(root / arch)
            tok.save_pretrained(root / arch)
            _MODELS[arch] = root / arch
    return dict(_MODELS)


def overrides(model_dir: Path, out: Path, **kw) -> list[str]:
    """Tiny, fast settings as dotted overrides; ``kw`` keys use ``__`` for ``.``
    (``fed__method="fedex"``) and replace the defaults below."""
    base = {
        "model.name": str(model_dir),
        "model.rank": 4,
        "model.max_length": 64,  # the tiny models' position embeddings
        "data.data_dir": str(GLUE),
        "data.max_train_examples": 80,
        "data.max_eval_examples": 40,
        "fed.rounds": 3,
        "partition.num_clients": 3,
        "train.batch_size": 8,
        # The tiny runs' own small rates (the defaults' 1e-3 and head 1e-2 are for real models):
        # the engine-equivalence tolerances were set at these, where round-off grows slowly.
        "train.lr": 5e-4,
        "train.head_lr": 0,
        "train.eval_batch_size": 64,
        "progress": "false",
        "threads": 1,
        "output_dir": str(out),
    }
    base.update({k.replace("__", "."): v for k, v in kw.items()})
    return [f"{k}={v}" for k, v in base.items()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_timings(row: dict) -> dict:
    """A metrics row without wall-clock fields (``train_s``, ``eval_s``, ...)."""
    return {k: v for k, v in row.items() if not k.endswith("_s")}


def assert_tree_equal(a, b, path: str = "") -> None:
    """Nested dicts/lists/tensors/numbers equal exactly (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"tensors differ at {path}: max |Δ| = {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"keys differ at {path}: {set(a) ^ set(b)}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > len(PNG_MAGIC) and path.read_bytes()[:8] == PNG_MAGIC
