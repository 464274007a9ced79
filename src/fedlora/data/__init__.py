"""fedlora.data — GLUE and user data: load, partition among clients, tokenize, score.

spec = get_task("SST-2")
train = load_glue(spec, "train", data_dir="glue_data")          # TextDataset
parts = partition(train.labels, 10, "dirichlet", alpha=0.5, seed=0)
print(format_histogram(label_histogram(train.labels, parts), spec.label_names))
tok = tokenize(train, tokenizer, max_length=128)                 # once per dataset
for b in length_bucketed_batches(tok.lengths, parts[0], 32, generator=g):
    batch = collate(tok, b, tokenizer.pad_token_id)
compute_metrics(spec, logits, labels)                            # {"accuracy": ...}
"""

from .errors import DataError
from .files import load_text_file
from .glue import load_glue
from .metrics import compute_metrics, primary_metric
from .partition import SCHEMES, bin_names, format_histogram, label_histogram, partition, regression_bins, write_histogram_csv
from .tasks import TASKS, TaskSpec, available_tasks, get_task
from .text import TextDataset
from .tokenize import TokenizedDataset, collate, length_bucketed_batches, tokenize

__all__ = [
    "DataError",
    "TaskSpec",
    "TASKS",
    "get_task",
    "available_tasks",
    "TextDataset",
    "load_glue",
    "load_text_file",
    "partition",
    "SCHEMES",
    "label_histogram",
    "format_histogram",
    "write_histogram_csv",
    "regression_bins",
    "bin_names",
    "compute_metrics",
    "primary_metric",
    "TokenizedDataset",
    "tokenize",
    "length_bucketed_batches",
    "collate",
]
