"""Where the model trains and in what precision (``train.device``, ``train.precision``).

Only the model and its batches move. Aggregation never does: clients hand the
core float32 CPU copies of their adapters (``FedModel.read_adapters``), the core
works in float32/float64 on CPU, and folds into the base weights wherever they
live (``core.fold``). So a bf16 or CUDA run aggregates exactly what an fp32 CPU
run would aggregate from the same adapters.

Precision is autocast: the weights stay float32 (the trainable adapters and
heads in particular), matrix products run in bf16 or fp16. fp16 needs a
gradient scaler (its 5-bit exponent underflows small gradients); bf16 has
fp32's range and needs none.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError

__all__ = ["Placement", "resolve_placement", "DEVICE_PATTERN", "PRECISIONS"]

DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """A resolved device and autocast dtype (None: plain fp32)."""

    device: torch.device
    dtype: torch.dtype | None = None

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_scaler(self) -> bool:
        return self.dtype is torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        """What trained, for reports that put runs from several machines side by side:
        ``"cuda: NVIDIA H100 80GB HBM3, bf16"``, ``"cpu: AMD EPYC 9R14 96-Core Processor, bf16"``."""
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
        elif self.device.type == "cpu":
            name = cpu_model_name()
        else:
            name = self.device.type
        return f"{self.device.type}: {name}, {self.precision}"

    def batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    return True


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo's first "model name"), or the platform's processor string."""
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        m = None
    if m:
        return m.group(1).strip()
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 AVX512-BF16 or AMX-BF16, from /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def _probe_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedlora" / "cpu_bf16_speedup.json"


@functools.cache
def cpu_bf16_speedup(threads: int, reps: int = 9) -> float:
    """fp32 time ÷ bf16-autocast time of a LoRA-sized product (256×384 by 384×1536, forward and backward),
    the best of ``reps`` each on ``threads`` threads (nine: the best of many is the timing least touched by other jobs).

    AVX512-BF16 alone does not make bf16 fast: it was 1.74× faster than fp32 on an AMD EPYC and 1.8×
    slower on an Intel Xeon with the same flag (BENCHMARKS.md "Precision"). Measured once per machine
    (CPU model, torch version and threads) and kept in ``$XDG_CACHE_HOME/fedlora`` (``~/.cache``): a
    timing taken beside other jobs can land on either side of the threshold, and two runs of one grid
    (or a run and its resume) must not train at two precisions. Delete the file to measure again. The
    probe takes about 0.3 s and draws from its own generator, so it never moves a seeded run's random numbers."""
    import json

    from ..atomic import atomic_write_text

    key = f"{cpu_model_name()} | torch {torch.__version__} | {threads} threads"
    path = _probe_cache()
    try:
        known = json.loads(path.read_text())
        if isinstance(known, dict) and isinstance(known.get(key), (int, float)):
            return float(known[key])
    except (OSError, ValueError):
        known = {}
    ratio = _time_bf16_speedup(reps)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**(known if isinstance(known, dict) else {}), key: ratio}, indent=1))
    except OSError:
        pass  # a read-only home: this process keeps its own measurement
    return ratio


def _time_bf16_speedup(reps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 384, generator=gen, requires_grad=True)
    w = torch.randn(1536, 384, generator=gen, requires_grad=True)

    def best(bf16: bool) -> float:
        out = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = torch.nn.functional.linear(x, w)
            y.float().sum().backward()
            out = min(out, time.perf_counter() - start)
        return out

    best(False), best(True)  # first calls build the kernels
    return best(False) / best(True)


def resolve_placement(device: str = "auto", precision: str = "auto") -> Placement:
    """``train.device`` and ``train.precision`` → a :class:`Placement`, or a ConfigError naming what is missing.

    ``auto`` device: CUDA when torch sees one, else MPS, else the CPU. ``auto``
    precision: bf16 on a GPU that supports it (fp16 with a scaler on older ones); on a CPU
    with bf16 instructions (AVX512-BF16 or AMX) bf16 where :func:`cpu_bf16_speedup` times it
    at least 1.1× faster than fp32 (1.74× the throughput at the same accuracy on one such CPU,
    BENCHMARKS.md "Precision"; slower on another), fp32 elsewhere (emulated bf16 is slower).
    A grid that must not depend on the machine's arithmetic pins ``train.precision``.
    """
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise ConfigError(f"train.device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device == "auto":
        device = next(d for d in ("cuda", "mps", "cpu") if _available(d))
    dev = torch.device(device)
    if not _available(dev.type):
        raise ConfigError(f"train.device={device!r} but torch sees no {dev.type.upper()} device (torch {torch.__version__}); use train.device=cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={device!r} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif dev.type == "cpu" and cpu_has_bf16() and cpu_bf16_speedup(torch.get_num_threads()) >= 1.1:
            precision = "bf16"
        else:
            precision = "fp32"
    if precision == "fp16" and dev.type == "cpu":
        raise ConfigError("train.precision=fp16 needs a GPU; on the CPU use bf16 (autocast) or fp32")
    return Placement(dev, _DTYPES[precision])
