"""Sentence pairs read by a bi-encoder (``model.pair_encoder: siamese``).

A cross-encoder reads a pair as one sequence, [CLS] a [SEP] b [SEP]. A sentence encoder such as
all-MiniLM-L6-v2 was trained the other way: each sentence encoded on its own and mean-pooled,
pairs compared by the cosine of their embeddings. On RTE its frozen cosine alone separates the
classes better than anything a LoRA cross-encoder learned (BENCHMARKS.md, "STS-B and RTE on dev").

Here the batch stays the tokenizer's pair encoding (tokenised once, as every task is); the model
cuts each row into the two sentences as the encoder reads them, [CLS] a [SEP] (token type 0) and
[CLS] b [SEP] (token type 1, with [CLS] put back in front), encodes each through the same encoder
with the same adapters, and mean-pools over its tokens:

    u = mean(E([CLS] a [SEP])),  v = mean(E([CLS] b [SEP])),  c = cos(u, v)
    logits = w·c + β   (w, β ∈ R^labels: the head ``classifier`` = Linear(1, labels))

A regression task (STS-B) predicts w·c + β itself, with w, β scalars. The head has 2·labels
parameters and trains in full as any classifier head; the adapters sit in the encoder as usual,
so every aggregation method applies unchanged. The two sentences go through the encoder as two
calls of N rows (not one of 2N), so each example's gradient is the sum over its own two calls.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .hub import ModelError

__all__ = ["SiameseClassifier", "as_siamese", "split_pair", "SIAMESE_HEAD"]

# The cosine head of a merged bi-encoder, beside its encoder folder (`fedlora merge`).
SIAMESE_HEAD = "siamese_head.json"


def split_pair(input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor, cls_id: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ids_a, mask_a, ids_b, mask_b): the right-padded pair rows [CLS] a [SEP] b [SEP] cut into
    [CLS] a [SEP] (the row's type-0 tokens) and [CLS] b [SEP] (its type-1 tokens after a [CLS]),
    each right-padded to its own longest row."""
    real = attention_mask.bool()
    len_a = (real & (token_type_ids == 0)).sum(1)
    len_b = (real & (token_type_ids == 1)).sum(1)
    if bool((len_b == 0).any()):
        raise ModelError("model.pair_encoder=siamese needs sentence pairs (two text columns); a row has no second sentence")
    width_a, width_b = int(len_a.max()), int(len_b.max()) + 1
    pos_a = torch.arange(width_a, device=input_ids.device)
    mask_a = pos_a[None, :] < len_a[:, None]
    ids_a = input_ids[:, :width_a].masked_fill(~mask_a, pad_id)
    pos_b = torch.arange(width_b, device=input_ids.device)
    mask_b = pos_b[None, :] <= len_b[:, None]  # [CLS] + the len_b tokens of b
    source = (len_a[:, None] + pos_b[None, :] - 1).clamp(0, input_ids.shape[1] - 1)
    ids_b = torch.gather(input_ids, 1, source)
    ids_b[:, 0] = cls_id
    ids_b = ids_b.masked_fill(~mask_b, pad_id)
    return ids_a, mask_a.long(), ids_b, mask_b.long()


def _mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class SiameseClassifier(nn.Module):
    """An encoder read as a bi-encoder, with the head ``classifier`` on the cosine of the two
    sentences' mean-pooled embeddings. ``config`` is the encoder's (num_labels, problem_type set)."""

    def __init__(self, encoder: nn.Module, config, cls_id: int, pad_id: int):
        super().__init__()
        self.encoder = encoder
        self.config = config
        self.cls_id, self.pad_id = int(cls_id), int(pad_id)
        self.classifier = nn.Linear(1, config.num_labels)
        # A head that starts at "no opinion": logits equal for every cosine (training moves it; a
        # random w would start the adapters on noise).
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean-pooled sentence embeddings, as sentence-transformers pools them."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return _mean_pool(hidden, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None, labels: Tensor | None = None, **_):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if token_type_ids is None:
            raise ModelError("model.pair_encoder=siamese needs a tokenizer that marks the second sentence with token_type_ids (BERT-style)")
        ids_a, mask_a, ids_b, mask_b = split_pair(input_ids, attention_mask, token_type_ids, self.cls_id, self.pad_id)
        cosine = F.cosine_similarity(self.embed(ids_a, mask_a), self.embed(ids_b, mask_b), dim=-1)
        logits = self.classifier(cosine.unsqueeze(-1))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def as_siamese(model: nn.Module, tokenizer) -> SiameseClassifier:
    """The sequence classifier ``model`` (as :func:`~fedlora.models.hub.load_pretrained` gives it)
    read as a bi-encoder: its encoder (``model.base_model``) kept without its pooler, its head
    replaced."""
    encoder = model.base_model
    if encoder is model or not hasattr(encoder, "embeddings"):
        raise ModelError(f"model.pair_encoder=siamese needs an encoder model (BERT-style); {model.config.model_type!r} is not one")
    if tokenizer.cls_token_id is None:
        raise ModelError("model.pair_encoder=siamese needs a tokenizer with a [CLS] token")
    # Mean pooling never reads the pooler (BERT's dense + tanh over [CLS]): dropped, it is neither
    # computed each forward nor adapted by a target such as "dense" (its adapters would get zero
    # gradient and still travel every round). `fedlora merge` puts the pretrained one back.
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return SiameseClassifier(encoder, model.config, tokenizer.cls_token_id, tokenizer.pad_token_id)
