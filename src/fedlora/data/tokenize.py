"""Tokenize a `TextDataset` once, then batch it by length and pad per batch.

`tokenize` runs the tokenizer over the whole dataset once (no padding) and stores the
token ids flat, with offsets: example i is ``ids[offsets[i]:offsets[i+1]]``. Every client,
round and epoch then draws batches from the same `TokenizedDataset`:

    tok = tokenize(train, tokenizer, max_length=128)
    for batch_idx in length_bucketed_batches(tok.lengths, client_indices, 32, generator=g):
        batch = collate(tok, batch_idx, tokenizer.pad_token_id)   # padded to the batch max
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch import Tensor

from .errors import DataError
from .text import TextDataset

__all__ = ["TokenizedDataset", "tokenize", "pair_separator", "length_bucketed_batches", "collate"]


@dataclass
class TokenizedDataset:
    """Unpadded token ids of N examples, stored flat.

    ``ids``: int64 (total tokens,); ``offsets``: int64 (N+1,); ``token_type_ids``: like
    ``ids`` or None when the tokenizer makes none (RoBERTa, GPT-2); ``labels``: int64 or
    float32 (N,); ``lengths``: int64 (N,), tokens per example (special tokens included).
    ``loss_mask``: like ``ids``, 1 on the tokens a causal LM learns to produce (an
    instruction's answer), or None for classification; then ``labels`` are only the
    examples' categories (for partitions), and batches get per-token labels.
    """

    ids: Tensor
    offsets: Tensor
    token_type_ids: Tensor | None
    labels: Tensor
    lengths: Tensor
    loss_mask: Tensor | None = None

    @property
    def is_causal(self) -> bool:
        return self.loss_mask is not None

    def __len__(self) -> int:
        return len(self.lengths)

    def input_ids(self, i: int) -> Tensor:
        """Token ids of example i (a view)."""
        return self.ids[self.offsets[i] : self.offsets[i + 1]]


def pair_separator(tokenizer) -> str | None:
    """What `tokenize` puts before a pair's second sentence: None when the tokenizer's own pair
    template adds tokens between the two (BERT's [SEP], RoBERTa's </s></s>, Llama's <s>); else
    (GPT-2, Qwen: a pair is the two token lists end to end) the tokenizer's sep token, or its
    eos token, and a space; a newline where it has neither."""
    if tokenizer.num_special_tokens_to_add(pair=True) != tokenizer.num_special_tokens_to_add(pair=False):
        return None
    token = getattr(tokenizer, "sep_token", None) or getattr(tokenizer, "eos_token", None)
    return f"{token} " if token else "\n"


def tokenize(dataset: TextDataset, tokenizer, max_length: int, *, chunk_size: int = 4096) -> TokenizedDataset:
    """Tokenize every example once: truncation to ``max_length`` (longest-first for pairs),
    special tokens added, no padding. Works with any Hugging Face tokenizer.

    A sentence pair is read through the tokenizer's pair template; a tokenizer without one
    (GPT-2-style) gets `pair_separator` prefixed to the second sentence, so the two never run
    together (the prefix is part of the second sentence for longest-first truncation, which
    cuts from its end)."""
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    sep = None if dataset.text_b is None else pair_separator(tokenizer)
    ids: list[np.ndarray] = []  # one flat int64 array per chunk
    types: list[np.ndarray] = []
    lengths: list[int] = []
    has_types = None
    for start in range(0, len(dataset), chunk_size):
        a = dataset.text_a[start : start + chunk_size]
        b = None if dataset.text_b is None else dataset.text_b[start : start + chunk_size]
        if sep is not None:
            b = [sep + t for t in b]
        enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=False, return_attention_mask=False)
        has_types = "token_type_ids" in enc if has_types is None else has_types
        lengths.extend(len(seq) for seq in enc["input_ids"])
        ids.append(np.fromiter(chain.from_iterable(enc["input_ids"]), dtype=np.int64))
        if has_types:
            types.append(np.fromiter(chain.from_iterable(enc["token_type_ids"]), dtype=np.int64))
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(lengths_t, 0, out=offsets[1:])
    labels = torch.from_numpy(np.ascontiguousarray(dataset.labels))
    flat = lambda parts: torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64))  # noqa: E731
    return TokenizedDataset(
        ids=flat(ids),
        offsets=offsets,
        token_type_ids=flat(types) if has_types else None,
        labels=labels.float() if dataset.is_regression else labels.long(),
        lengths=lengths_t,
    )


def length_bucketed_batches(
    lengths, indices, batch_size: int, *, generator: torch.Generator | None, shuffle: bool = True, bucket_factor: int = 50
) -> list[np.ndarray]:
    """Batches (arrays of dataset indices) with similar lengths, to waste little padding.

    Training (``shuffle=True``): shuffle ``indices``, cut them into chunks of
    ``batch_size * bucket_factor``, sort each chunk by length, cut it into batches and
    shuffle the order of all batches. Randomness comes from ``generator`` only (torch's
    global RNG if None), so a seeded generator gives the same batches every run.
    Evaluation (``shuffle=False``): sort all indices by length (stable) and cut; no RNG.
    Only the last batch may be smaller than ``batch_size``.
    """
    if batch_size < 1 or bucket_factor < 1:
        raise DataError(f"batch_size and bucket_factor must be ≥ 1, got {batch_size}, {bucket_factor}")
    lengths = np.asarray(lengths.numpy() if isinstance(lengths, Tensor) else lengths)
    idx = np.asarray(indices.numpy() if isinstance(indices, Tensor) else indices, dtype=np.int64).reshape(-1)
    if len(idx) == 0:
        return []

    def cut(sorted_idx: np.ndarray) -> list[np.ndarray]:
        return [sorted_idx[i : i + batch_size] for i in range(0, len(sorted_idx), batch_size)]

    if not shuffle:
        return cut(idx[np.argsort(lengths[idx], kind="stable")])
    idx = idx[torch.randperm(len(idx), generator=generator).numpy()]
    chunk = batch_size * bucket_factor
    batches: list[np.ndarray] = []
    for start in range(0, len(idx), chunk):
        part = idx[start : start + chunk]
        batches.extend(cut(part[np.argsort(lengths[part], kind="stable")]))
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def collate(tokenized: TokenizedDataset, batch_indices, pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad one batch to its longest example.

    Returns ``input_ids``, ``attention_mask`` (1 = token, 0 = pad), ``token_type_ids``
    (padded with 0; only if the tokenizer made them) and ``labels``: per example, or for
    causal LM data per token (the ids where ``loss_mask`` is 1, -100 elsewhere and on pads).
    """
    if pad_token_id is None:
        raise DataError("collate needs a pad_token_id (set tokenizer.pad_token, e.g. to eos)")
    idx = torch.as_tensor(np.asarray(batch_indices, dtype=np.int64))
    lens = tokenized.lengths[idx]
    width = int(lens.max()) if len(idx) else 0
    input_ids = torch.full((len(idx), width), int(pad_token_id), dtype=torch.int64)
    mask = torch.zeros((len(idx), width), dtype=torch.int64)
    types = None if tokenized.token_type_ids is None else torch.zeros_like(input_ids)
    learn = None if tokenized.loss_mask is None else torch.zeros_like(input_ids)
    for row, i in enumerate(idx.tolist()):
        lo, hi = int(tokenized.offsets[i]), int(tokenized.offsets[i + 1])
        input_ids[row, : hi - lo] = tokenized.ids[lo:hi]
        mask[row, : hi - lo] = 1
        if types is not None:
            types[row, : hi - lo] = tokenized.token_type_ids[lo:hi]
        if learn is not None:
            learn[row, : hi - lo] = tokenized.loss_mask[lo:hi]
    out = {"input_ids": input_ids, "attention_mask": mask}
    if types is not None:
        out["token_type_ids"] = types
    out["labels"] = tokenized.labels[idx] if learn is None else input_ids.masked_fill(learn == 0, -100)
    return out
