"""GLUE tasks as prompts for causal LMs, answered with label words (``data.as_prompt: true``).

Each example becomes an instruction (the task's question, then its sentence or
sentence pair) whose answer is its label's word (SST-2: ``negative``/``positive``;
the NLI tasks: ``yes``/``no``, MNLI also ``maybe``). Training is ordinary
instruction tuning on those answers. Evaluation scores every label word by its
log-likelihood after the prompt, s_ik = Σ_t log p(w_k,t | prompt_i, w_k,<t), and
reports the task's official metric from those scores, so an encoder classifier
and a decoder are compared on the same data and metric:

* classification: the predicted class is argmax_k s_ik (accuracy, F1, MCC);
* STS-B: its 0–5 scores are binned to the words ``0`` … ``5`` for training; the
  prediction is the expected value Σ_k k·softmax(s_i)_k, scored with Pearson and
  Spearman against the original, unbinned scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .instruct import InstructDataset
from .metrics import compute_metrics
from .tasks import TaskSpec
from .text import TextDataset

__all__ = ["PromptTemplate", "PROMPTS", "glue_as_instructions", "prompt_metrics"]


@dataclass(frozen=True)
class PromptTemplate:
    question: str
    words: tuple[str, ...]  # one per class id (per bin 0…5 for STS-B)


_YES_NO_NLI = ("yes", "no")  # entailment, not_entailment
PROMPTS: dict[str, PromptTemplate] = {
    "sst2": PromptTemplate("Is the sentiment of this movie review positive or negative?", ("negative", "positive")),
    "cola": PromptTemplate("Is this sentence grammatically acceptable? Answer yes or no.", ("no", "yes")),
    "mrpc": PromptTemplate("Do the two sentences mean the same thing? Answer yes or no.", ("no", "yes")),
    "qqp": PromptTemplate("Do the two questions ask the same thing? Answer yes or no.", ("no", "yes")),
    "mnli": PromptTemplate("Does the first sentence imply the second? Answer yes, maybe or no.", ("yes", "maybe", "no")),
    "mnli-mm": PromptTemplate("Does the first sentence imply the second? Answer yes, maybe or no.", ("yes", "maybe", "no")),
    "qnli": PromptTemplate("Does the sentence answer the question? Answer yes or no.", _YES_NO_NLI),
    "rte": PromptTemplate("Does the first sentence imply the second? Answer yes or no.", _YES_NO_NLI),
    "wnli": PromptTemplate("Does the first sentence imply the second? Answer yes or no.", ("no", "yes")),  # not_entailment, entailment
    "stsb": PromptTemplate("How similar are the two sentences, from 0 (unrelated) to 5 (same meaning)? Answer with one number.", tuple("012345")),
}


def glue_as_instructions(task: TaskSpec, text: TextDataset) -> InstructDataset:
    """A GLUE split as instructions answered by label words; ``labels`` are class ids (bins for STS-B)."""
    if task.name not in PROMPTS:
        raise DataError(f"no label-word prompt for task {task.name!r}; prompts exist for {', '.join(PROMPTS)}")
    t = PROMPTS[task.name]
    if task.is_regression:
        classes = np.clip(np.rint(text.labels), 0, 5).astype(np.int64)
    else:
        classes = text.labels.astype(np.int64)
    prompts = []
    for i in range(len(text)):
        body = text.text_a[i] if text.text_b is None else f"{text.text_a[i]}\n{text.text_b[i]}"
        prompts.append([{"role": "user", "content": f"{t.question}\n\n{body}"}])
    return InstructDataset(prompts, [t.words[c] for c in classes], classes, list(t.words))


def prompt_metrics(task: TaskSpec, scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """The task's official metrics from label-word scores s (N×K): argmax for classes, the
    expected bin Σ_k k·softmax(s)_k for STS-B."""
    if task.is_regression:
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return compute_metrics(task, p @ np.arange(scores.shape[1], dtype=np.float64), targets)
    return compute_metrics(task, scores, targets)
