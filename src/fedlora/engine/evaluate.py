"""Evaluation: logits of a model on tokenised examples, then the task's official metrics;
for causal LMs, the held-out loss of the answers and its perplexity, and greedy answers."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data import collate, compute_metrics, length_bucketed_batches
from ..models.device import Placement

__all__ = ["predict", "evaluate", "language_model_loss", "generate_answers", "label_word_scores", "stop_token_ids"]

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
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="sum").cpu().double()
        count += int((target != -100).sum())
    loss = float(nll) / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


@torch.no_grad()
def label_word_scores(
    model, prompts: list[list[int]], answers: list[list[list[int]]], batch_size: int, pad_token_id: int, place: Placement = CPU
) -> np.ndarray:
    """s[i, k] = Σ_t log p(a_ikt | prompt_i, a_ik<t): how likely the model finds answer k after prompt i.

    Every (prompt, answer) pair is one sequence; sequences are sorted by length and
    right-padded in batches, so a prompt's score never depends on its batch."""
    model.eval()
    pairs = [(i, k, prompts[i] + a, len(prompts[i])) for i in range(len(prompts)) for k, a in enumerate(answers[i])]
    pairs.sort(key=lambda q: len(q[2]))
    scores = np.zeros((len(prompts), max(len(a) for a in answers)), dtype=np.float64)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        width = max(len(q[2]) for q in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        answer = torch.zeros((len(chunk), width - 1), dtype=torch.bool)  # position t predicts token t+1
        for r, (_, _, seq, n_prompt) in enumerate(chunk):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            answer[r, n_prompt - 1 : len(seq) - 1] = True
        with place.autocast():
            logits = model(input_ids=ids.to(place.device), attention_mask=mask.to(place.device)).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None].to(place.device))[..., 0].cpu().double()
        for r, (i, k, _, _) in enumerate(chunk):
            scores[i, k] = float(logp[r][answer[r]].sum())
    return scores


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: the model's generation config's EOS ids and the tokenizer's EOS
    (training appends the tokenizer's, ``data/instruct.py``; a hub model's generation config may
    name others, e.g. Llama 3's end-of-turn beside its end-of-text), in that order, once each."""
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = config if isinstance(config, list | tuple) else [] if config is None else [config]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return list(dict.fromkeys(int(i) for i in ids))


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, place: Placement = CPU) -> list[str]:
    """Greedy answers to prompts given as token ids, one at a time (no padding to get wrong)."""
    model.eval()
    stop = stop_token_ids(model, tokenizer) or None
    out = []
    for ids in prompts:
        x = torch.tensor([ids], device=place.device)
        with place.autocast():
            y = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop,
            )
        out.append(tokenizer.decode(y[0, len(ids) :], skip_special_tokens=True).strip())
    return out


def evaluate(model, data, indices: np.ndarray, task, batch_size: int, pad_token_id: int, place: Placement = CPU) -> dict[str, float]:
    if data.is_causal:
        return language_model_loss(model, data, indices, batch_size, pad_token_id, place)
    logits, labels = predict(model, data, indices, batch_size, pad_token_id, place)
    return compute_metrics(task, logits, labels)
