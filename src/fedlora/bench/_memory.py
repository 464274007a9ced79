"""Peak resident memory of a block of code, torch CPU allocations included.

tracemalloc only sees Python's allocator, not torch's CPU tensors, so it would
report almost nothing for an aggregation. Instead this measures the process's
resident set: Linux keeps a high-water mark (VmHWM) that writing "5" to
/proc/self/clear_refs resets to the current RSS. ``peak − RSS at entry`` is
then the most extra memory the block ever held (intermediates and the output
it returns), whatever allocated it. Each benchmark row runs in its own
process, so other rows' memory cannot leak into the figure.

Before the reset, free heap memory that glibc keeps for reuse is handed back to
the OS (malloc_trim), so that memory the block re-uses from earlier, already
freed allocations shows up as growth too instead of hiding in the baseline.

Where clear_refs is not available the high-water mark cannot be reset and the
figure falls back to the ru_maxrss delta, which is only a lower bound
(``exact`` is then False and the table marks it with "≥").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource

try:
    _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakRSS:
    """``with PeakRSS() as p: ...`` then ``p.mib`` = peak extra resident memory in MiB."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        if _malloc_trim is not None:
            _malloc_trim(0)
        self.exact = _reset_peak()
        if self.exact:
            self._start = _status_kib("VmRSS")
        else:
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.mib = 0.0
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mib = max(0, peak - self._start) / 1024
