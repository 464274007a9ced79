"""GLUE task specifications: one `TaskSpec` per task, looked up with `get_task`.

Label ids follow the Hugging Face hub dataset `nyu-mll/glue` (the same order as the
GLUE TSV files where those carry integer labels), so a model trained from local TSVs and
one trained from the hub agree on what class 0 means.

``text_columns`` and ``label_column`` are the hub column names; the local TSV layouts
(which differ per task) live in ``glue.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DataError

__all__ = ["TaskSpec", "TASKS", "get_task", "available_tasks"]


@dataclass(frozen=True)
class TaskSpec:
    """Everything the data layer needs to know about one GLUE task."""

    name: str  # canonical name: "sst2", "mnli-mm", ...
    hub_config: str  # config of `nyu-mll/glue` ("mnli" for mnli-mm)
    text_columns: tuple[str, ...]  # hub text columns, one or two
    label_names: tuple[str, ...] | None  # id -> name; None for regression (stsb)
    metrics: tuple[str, ...]  # keys produced by `compute_metrics`
    primary_metric: str  # the one number reported per task
    local_dir: str  # GLUE download folder: "SST-2", "MNLI", ...
    train_file: str = "train.tsv"
    dev_file: str = "dev.tsv"
    hub_train_split: str = "train"
    hub_dev_split: str = "validation"
    label_column: str = "label"
    lower_is_better: bool = False  # the primary metric is a loss (perplexity): the best round has the least

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """Outputs of the classification head: 1 for regression, else the class count."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2


_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("cola", "cola", ("sentence",), ("unacceptable", "acceptable"), ("mcc",), "mcc", "CoLA"),
        TaskSpec("sst2", "sst2", ("sentence",), ("negative", "positive"), ("accuracy",), "accuracy", "SST-2"),
        TaskSpec("mrpc", "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"), "accuracy", "MRPC"),
        TaskSpec("stsb", "stsb", ("sentence1", "sentence2"), None, ("pearson", "spearman"), "pearson", "STS-B"),
        TaskSpec("qqp", "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"), "accuracy", "QQP"),
        TaskSpec(
            "mnli",
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            "accuracy",
            "MNLI",
            dev_file="dev_matched.tsv",
            hub_dev_split="validation_matched",
        ),
        TaskSpec(
            "mnli-mm",
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            "accuracy",
            "MNLI",
            dev_file="dev_mismatched.tsv",
            hub_dev_split="validation_mismatched",
        ),
        TaskSpec("qnli", "qnli", ("question", "sentence"), _NLI2, ("accuracy",), "accuracy", "QNLI"),
        TaskSpec("rte", "rte", ("sentence1", "sentence2"), _NLI2, ("accuracy",), "accuracy", "RTE"),
        TaskSpec("wnli", "wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), "accuracy", "WNLI"),
    ]
}

_ALIASES = {"mnli-m": "mnli", "mnlim": "mnli", "mnli-matched": "mnli", "mnlimm": "mnli-mm", "mnli-mismatched": "mnli-mm"}


def available_tasks() -> list[str]:
    return list(TASKS)


def get_task(name: str | TaskSpec) -> TaskSpec:
    """Look a task up by name: case-insensitive, "SST-2"/"sst_2"/"sst2", "STS-B", "MNLI-m", ..."""
    if isinstance(name, TaskSpec):
        return name
    key = str(name).strip().lower().replace("_", "-")
    if key in TASKS or key in _ALIASES:
        return TASKS[_ALIASES.get(key, key)]
    squashed = key.replace("-", "")  # "sst-2" -> "sst2", "sts-b" -> "stsb"
    for canonical in TASKS:
        if canonical.replace("-", "") == squashed:
            return TASKS[canonical]
    if squashed in _ALIASES:
        return TASKS[_ALIASES[squashed]]
    raise DataError(f"unknown GLUE task {name!r}; known tasks: {', '.join(TASKS)}")
