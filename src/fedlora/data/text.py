"""`TextDataset`: raw texts and labels in memory, before tokenization."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import DataError

__all__ = ["TextDataset"]


@dataclass
class TextDataset:
    """Parallel lists of texts and a label array.

    ``labels`` is int64 class ids for classification and float32 scores for regression
    (the dtype is what tells them apart). ``text_b`` is None for single-sentence tasks.
    """

    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray
    label_names: list[str] | None = None

    def __post_init__(self):
        self.labels = np.asarray(self.labels)
        if self.labels.dtype.kind == "f":
            self.labels = self.labels.astype(np.float32)
        elif self.labels.dtype.kind in "iub":
            self.labels = self.labels.astype(np.int64)
        else:
            raise DataError(f"labels must be integer or float, got dtype {self.labels.dtype}")
        n = len(self.text_a)
        if self.labels.shape != (n,) or (self.text_b is not None and len(self.text_b) != n):
            raise DataError(
                f"text_a ({n}), text_b ({None if self.text_b is None else len(self.text_b)}) and labels {self.labels.shape} must have the same length"
            )

    def __len__(self) -> int:
        return len(self.text_a)

    @property
    def is_regression(self) -> bool:
        return self.labels.dtype.kind == "f"

    @property
    def num_classes(self) -> int | None:
        """Number of classes (from label_names, else max label + 1); None for regression."""
        if self.is_regression:
            return None
        if self.label_names is not None:
            return len(self.label_names)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """A new dataset with the examples at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return TextDataset(
            text_a=[self.text_a[i] for i in idx],
            text_b=None if self.text_b is None else [self.text_b[i] for i in idx],
            labels=self.labels[idx],
            label_names=self.label_names,
        )
