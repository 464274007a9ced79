"""A run folder's files, each rewritten atomically from the run's history:

config.yaml         the resolved configuration
metrics.jsonl/.csv  one row per round: global-model metrics, losses, bytes, timings
clients.jsonl/.csv  one row per client per round (two for a round that failed under local DP and was
                    replayed: both attempts' steps count in ε): examples, loss, rank, bytes down/up
label_histogram.csv per-client label counts (and label_histogram.png)
summary.json        best-over-rounds and final-round metrics
checkpoint.pt       server state + folded base weights (resume)
adapter/            the final global adapter in peft format
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_write_text

__all__ = ["RunWriter"]


def _csv(rows: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    return buf.getvalue()


class RunWriter:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)

    def path(self, name: str) -> Path:
        return self.dir / name

    def write_config(self, cfg_dict: dict) -> None:
        atomic_write_text(self.path("config.yaml"), yaml.safe_dump(cfg_dict, sort_keys=False))

    def write_rows(self, stem: str, rows: list[dict[str, Any]]) -> None:
        atomic_write_text(self.path(stem + ".jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(self.path(stem + ".csv"), _csv(rows) if rows else "")

    def write_json(self, name: str, data: dict) -> None:
        atomic_write_text(self.path(name), json.dumps(data, indent=2) + "\n")

    def write_histogram(self, hist, label_names: list[str]) -> None:
        names = label_names or [f"bin{j}" for j in range(hist.shape[1])]
        rows = [{"client": f"client{i}", **{n: int(c) for n, c in zip(names, row)}, "total": int(row.sum())} for i, row in enumerate(hist)]
        atomic_write_text(self.path("label_histogram.csv"), _csv(rows))
