"""Evaluation: logits of a model on tokenised examples, then the task's official metrics."""

from __future__ import annotations

import numpy as np
import torch

from ..data import collate, compute_metrics, length_bucketed_batches
from ..models.device import Placement

__all__ = ["predict", "evaluate"]

CPU = Placement(torch.device("cpu"))


@torch.no_grad()
def predict(model, data, indices: np.ndarray, batch_size: int, pad_token_id: int, place: Placement = CPU) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) for ``indices``, in length-sorted batch order (metrics need only the pairing)."""
    model.eval()
    logits, labels = [], []
    for batch_idx in length_bucketed_batches(data.lengths, indices, batch_size, generator=None, shuffle=False):
        batch = collate(data, batch_idx, pad_token_id)
        labels.append(batch.pop("labels"))
        with place.autocast():
            logits.append(model(**place.batch(batch)).logits.float().cpu())
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate(model, data, indices: np.ndarray, task, batch_size: int, pad_token_id: int, place: Placement = CPU) -> dict[str, float]:
    logits, labels = predict(model, data, indices, batch_size, pad_token_id, place)
    return compute_metrics(task, logits, labels)
