"""Modules aggregated side by side, one per core.

Every method aggregates each adapted module independently of the others. The work per module
is a handful of small LAPACK/BLAS calls on tall-skinny factors (a QR of 11008×160, a 160×160
SVD), which a multi-threaded BLAS spreads over the cores poorly: on 2 cores a QR runs 1.7×
faster than on one, and the Python between the calls runs on one core only. Running modules
side by side, each on one thread, keeps every core busy instead (measured on the SVD of 28
LLaMA-7B modules at k = 160: 4.05 s per 32 layers against 6.19 s one module at a time on
2 threads; BENCHMARKS.md, "Aggregation at LLaMA-7B shape").

Results do not depend on the number of workers: each module is computed by the same
single-threaded calls whatever runs beside it (with one thread configured, modules simply
run one after the other on that thread).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["per_module"]

T = TypeVar("T")
_inside = threading.local()


def per_module(fn: Callable[[str], T], names: Iterable[str]) -> dict[str, T]:
    """``{name: fn(name)}`` for every module, modules spread over torch's threads.

    While it runs, torch uses one intra-op thread (each worker's calls run on the worker
    itself); the setting is restored afterwards. A call inside ``fn`` runs sequentially. The
    first exception raised by ``fn`` (in ``names`` order) propagates.
    """
    names = list(names)
    workers = min(torch.get_num_threads(), len(names))
    if workers <= 1 or getattr(_inside, "active", False):
        with _single_thread():
            return {name: fn(name) for name in names}
    with _single_thread(), ThreadPoolExecutor(workers) as pool:
        return dict(zip(names, pool.map(_marked(fn), names)))


def _marked(fn: Callable[[str], T]) -> Callable[[str], T]:
    def run(name: str) -> T:
        _inside.active = True
        try:
            return fn(name)
        finally:
            _inside.active = False

    return run


class _single_thread:
    """torch.set_num_threads(1) inside the block (per-module results then never depend on how
    many threads torch was given), restored after; re-entrant."""

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        if self.before != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self.before != 1:
            torch.set_num_threads(self.before)
