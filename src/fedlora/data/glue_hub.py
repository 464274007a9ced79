"""GLUE from the Hugging Face hub (``datasets.load_dataset("nyu-mll/glue", ...)``).

`load_hub` raises `HubUnavailable` (not `DataError`) when the hub, or the ``datasets``
cache in offline mode, cannot serve a split, so that `load_glue` can word one error for
each source: ``hub`` says how to read a local copy instead, ``auto`` names the local
folder it looked for as well. With ``probe=True`` (the ``auto`` fallback) the hub is
asked once with a short timeout first: a machine without network fails in seconds
instead of waiting out ``datasets``' own timeouts and retries.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import DataError
from .tasks import TaskSpec
from .text import TextDataset

__all__ = ["HUB_DATASET", "HubUnavailable", "hub_offline", "load_hub"]

HUB_DATASET = "nyu-mll/glue"
PROBE_TIMEOUT_S = 5.0


class HubUnavailable(Exception):
    """The hub did not serve a split: offline, unreachable, no ``datasets`` package, ...
    The message is the reason only; `load_glue` says what was being loaded."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def hub_offline() -> bool:
    """Hugging Face offline mode (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE`` set): ``datasets`` reads only its cache, at once."""
    env = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on it
        return env
    return env or bool(constants.HF_HUB_OFFLINE)


def _probe(timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise `HubUnavailable` unless the hub's endpoint answers within ``timeout`` seconds
    (any HTTP answer counts; the hub client's session honours proxies)."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session
    except ImportError:  # pragma: no cover - old huggingface_hub: no probe
        return
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # DNS, refused, timed out, TLS ...: all mean "not now"
        raise HubUnavailable(f"no answer from {constants.ENDPOINT} within {timeout:g} s ({type(e).__name__}; HF_HUB_OFFLINE=1 uses a cached copy)") from e


def load_hub(spec: TaskSpec, split: str, *, probe: bool = False) -> TextDataset:
    """``split`` ("train"/"dev") of ``spec`` from the hub as a `TextDataset`."""
    hub_split = spec.hub_train_split if split == "train" else spec.hub_dev_split
    try:
        import datasets
    except ImportError as e:
        raise HubUnavailable(f"loading from the hub needs the 'datasets' package ({e})") from e
    if probe and not hub_offline():
        _probe()
    try:
        hf = datasets.load_dataset(HUB_DATASET, spec.hub_config, split=hub_split)
    except Exception as e:  # offline, rate-limited, renamed ...: all end the same way
        raise HubUnavailable(f"{type(e).__name__}: {_one_line(e)}") from e
    missing = [c for c in (*spec.text_columns, spec.label_column) if c not in hf.column_names]
    if missing:
        raise DataError(f"hub dataset {HUB_DATASET}/{spec.hub_config} lacks columns {missing}; found {hf.column_names}")
    dtype = np.float32 if spec.is_regression else np.int64
    labels = np.asarray(hf[spec.label_column], dtype=dtype)
    if not spec.is_regression and (labels < 0).any():
        raise DataError(f"hub split {hub_split!r} of {spec.name} has unlabeled rows (label -1)")
    texts = [list(hf[c]) for c in spec.text_columns]
    return TextDataset(
        texts[0],
        texts[1] if len(texts) > 1 else None,
        labels,
        None if spec.label_names is None else list(spec.label_names),
    )
