"""Instruction data for causal language models: load, template, tokenize once.

Files (``data.task: instruct``, ``data.train_file`` / ``data.eval_file``):

* JSONL, one example per line, either ``{"instruction", "input"?, "output"}``
  (Alpaca's fields) or ``{"messages": [{"role", "content"}, …]}`` whose last
  message is the assistant's answer; any line may carry a category field
  (``data.category_field``, e.g. ``"category"``) that partitions can skew by;
* CSV with the columns ``instruction``, ``output`` (``input`` and the category
  column optional).

Templating. A tokenizer with a chat template renders the conversation with it
(the prompt with ``add_generation_prompt=True``, the answer as the assistant's
turn, end-of-turn token included); one without gets a plain template,
``### Instruction:\\n…\\n\\n### Response:\\n`` + answer + EOS. The loss is on the
answer's tokens only: :func:`tokenize_instruct` stores a ``loss_mask`` beside the
ids and :func:`~fedlora.data.tokenize.collate` turns it into labels (-100
elsewhere), so prompts never train the model to produce them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .files import csv_rows, jsonl_rows
from .tokenize import TokenizedDataset

__all__ = ["InstructDataset", "load_instruct_file", "tokenize_instruct", "render_prompt", "answer_ids", "PLAIN_PROMPT"]

PLAIN_PROMPT = "### Instruction:\n{user}\n\n### Response:\n"


@dataclass
class InstructDataset:
    """Conversations up to the answer (``prompts``), the answers, and a category id each."""

    prompts: list[list[dict[str, str]]]
    responses: list[str]
    labels: np.ndarray  # int64 category ids (all 0 without a category field)
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.responses)

    def subset(self, indices) -> InstructDataset:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return InstructDataset([self.prompts[i] for i in idx], [self.responses[i] for i in idx], self.labels[idx], self.label_names)

    @property
    def is_regression(self) -> bool:
        return False


def _text(value, what: str, where: str, *, optional: bool = False) -> str:
    """A field's text; DataError naming ``where`` and ``what`` for null, a non-string or blank text
    (a JSON null would otherwise train on the word "None"). ``optional``: null and "" give ""."""
    if optional and (value is None or value == ""):
        return ""
    if value is None:
        raise DataError(f"{where}: {what} is null")
    if not isinstance(value, str):  # only JSON gives other types; their repr is no text
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__} {value!r:.40}")
    if not value.strip():
        raise DataError(f"{where}: {what} is empty")
    return value


def _example(row: dict, where: str) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, answer) from one record; DataError naming ``where`` if it has no answer,
    no prompt before it, or a field that is null, blank or not a string (``input`` may be absent,
    null or empty)."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        if msgs[-1]["role"] != "assistant" or msgs[-1]["content"] is None or not str(msgs[-1]["content"]).strip():
            raise DataError(f"{where}: the last message must be the assistant's answer, and not empty (a conversation with no response)")
        if len(msgs) < 2:
            raise DataError(f"{where}: 'messages' holds only the assistant's answer; it needs at least one message (the prompt) before it")
        out = [
            {"role": _text(m["role"], f"the role of message {i}", where), "content": _text(m["content"], f"the content of message {i} ({m['role']!r})", where)}
            for i, m in enumerate(msgs, start=1)
        ]
        return out[:-1], out[-1]["content"]
    if "instruction" not in row or "output" not in row:
        raise DataError(f"{where}: needs 'instruction' and 'output' fields (or a 'messages' list); found {sorted(row)}")
    if row["output"] is None or (isinstance(row["output"], str) and not row["output"].strip()):
        raise DataError(f"{where}: 'output' is empty (an instruction with no response)")
    answer = _text(row["output"], "'output'", where)
    user = _text(row["instruction"], "'instruction'", where)
    extra = _text(row.get("input"), "'input'", where, optional=True)
    if extra:
        user += "\n\n" + extra
    return [{"role": "user", "content": user}], answer


def load_instruct_file(path: str | Path, *, category_field: str = "", category_names: list[str] | None = None) -> InstructDataset:
    """Read a JSONL or CSV instruction file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"instruction file {str(path)!r} not found")
    if path.suffix == ".jsonl":
        rows = [(f"{path}:{n}", row) for n, row in jsonl_rows(path)]
    elif path.suffix == ".csv":
        rows = [(f"{path}:{n}", row) for n, row in csv_rows(path)]
    else:
        raise DataError(f"instruction file {str(path)!r} must end in .jsonl or .csv")
    if not rows:
        raise DataError(f"instruction file {str(path)!r} holds no examples")
    prompts, answers, cats = [], [], []
    for where, row in rows:
        p, a = _example(row, where)
        prompts.append(p)
        answers.append(a)
        if category_field:
            if category_field not in row:
                raise DataError(f"{where}: no category field {category_field!r} (data.category_field)")
            cat = row[category_field]
            if isinstance(cat, int) and not isinstance(cat, bool):  # JSON 3 and CSV "3" are one category
                cat = str(cat)
            cats.append(_text(cat, f"the category field {category_field!r} (data.category_field)", where))
    names = list(category_names) if category_names is not None else sorted(set(cats)) if cats else ["all"]
    index = {c: i for i, c in enumerate(names)}
    unknown = sorted(set(cats) - set(index))
    if unknown:
        raise DataError(f"{path}: categories {unknown[:5]} do not occur in the training file")
    labels = np.array([index[c] for c in cats] if cats else [0] * len(answers), dtype=np.int64)
    return InstructDataset(prompts, answers, labels, names)


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation up to where the assistant's answer starts."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    user = "\n\n".join(m["content"] for m in messages)
    return list(tokenizer(PLAIN_PROMPT.format(user=user))["input_ids"])


def answer_ids(tokenizer, messages: list[dict[str, str]], answer: str, prompt: list[int]) -> list[int]:
    """Token ids of the answer as the template ends it (end-of-turn or EOS)."""
    if getattr(tokenizer, "chat_template", None):
        full = list(tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=True, return_dict=False))
        if full[: len(prompt)] == prompt and len(full) > len(prompt):
            return full[len(prompt) :]
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def tokenize_instruct(dataset: InstructDataset, tokenizer, max_length: int) -> TokenizedDataset:
    """Prompt + answer ids per example (no padding), with ``loss_mask`` = 1 on the answer.

    Too long: the answer is cut at the end, and the prompt from its start (its last
    tokens, next to the answer, are kept) when the answer alone would not fit in
    half of ``max_length``; at least one answer token always remains."""
    if max_length < 4:
        raise DataError(f"max_length must be at least 4 for instruction data, got {max_length}")
    ids, mask, lengths = [], [], []
    for messages, answer in zip(dataset.prompts, dataset.responses):
        prompt = render_prompt(tokenizer, messages)
        ans = answer_ids(tokenizer, messages, answer, prompt)
        keep_ans = min(len(ans), max(max_length - len(prompt), max_length // 2))
        keep_prompt = min(len(prompt), max_length - keep_ans)
        prompt, ans = prompt[len(prompt) - keep_prompt :], ans[:keep_ans]
        ids.append(np.asarray(prompt + ans, dtype=np.int64))
        mask.append(np.concatenate([np.zeros(len(prompt), np.int64), np.ones(len(ans), np.int64)]))
        lengths.append(len(prompt) + len(ans))
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(lengths_t, 0, out=offsets[1:])
    return TokenizedDataset(
        ids=torch.from_numpy(np.concatenate(ids)),
        offsets=offsets,
        token_type_ids=None,
        labels=torch.from_numpy(dataset.labels.copy()),
        lengths=lengths_t,
        loss_mask=torch.from_numpy(np.concatenate(mask)),
    )
