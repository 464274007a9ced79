"""Evaluation: logits of a model on tokenised examples, then the task's official metrics;
for causal LMs, the held-out loss of the answers and its perplexity, and greedy answers."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data import collate, compute_metrics, length_bucketed_batches
from ..models.device import Placement

__all__ = ["predict", "evaluate", "language_model_loss", "generate_answers"]

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


@torch.no_grad()
def language_model_loss(model, data, indices: np.ndarray, batch_size: int, pad_token_id: int, place: Placement = CPU) -> dict[str, float]:
    """Mean negative log-likelihood per answer token, ℓ = −(1/N) Σ log p(y_t | y_<t), over all
    ``indices`` at once (not a mean of batch means), and the perplexity exp(ℓ)."""
    model.eval()
    nll = torch.zeros((), dtype=torch.float64)
    count = 0
    for batch_idx in length_bucketed_batches(data.lengths, indices, batch_size, generator=None, shuffle=False):
        batch = place.batch(collate(data, batch_idx, pad_token_id))
        labels = batch.pop("labels")
        with place.autocast():
            logits = model(**batch).logits
        target = labels[:, 1:]  # token t is predicted from the tokens before it
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="sum").double().cpu()
        count += int((target != -100).sum())
    loss = float(nll) / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, place: Placement = CPU) -> list[str]:
    """Greedy answers to prompts given as token ids, one at a time (no padding to get wrong)."""
    model.eval()
    out = []
    for ids in prompts:
        x = torch.tensor([ids], device=place.device)
        with place.autocast():
            y = model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        out.append(tokenizer.decode(y[0, len(ids) :], skip_special_tokens=True).strip())
    return out


def evaluate(model, data, indices: np.ndarray, task, batch_size: int, pad_token_id: int, place: Placement = CPU) -> dict[str, float]:
    if data.is_causal:
        return language_model_loss(model, data, indices, batch_size, pad_token_id, place)
    logits, labels = predict(model, data, indices, batch_size, pad_token_id, place)
    return compute_metrics(task, logits, labels)
