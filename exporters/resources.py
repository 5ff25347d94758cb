"""What an export step costs on this machine (wall time, peak resident memory), and whether the next
one fits in the memory left, asked before it starts rather than learned from the kernel's OOM killer.

    with measured() as cost:           # cost = {"seconds": 12.3, "peak_rss_mb": 812.0} afterwards
        build(...)
    require_memory(need_bytes, "INT8 calibration of model.onnx", "lower export.calibration_size ...")

Peak resident memory is the kernel's high-water mark of this process (VmHWM), reset at the start of
each measured step where Linux allows it (writing 5 to /proc/self/clear_refs), so each step reports
its own peak; elsewhere it is the peak since the process started (getrusage), and says so.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from exporters.errors import ExportError

MB = 1e6


class MemoryBudgetError(ExportError):
    """A step would need more memory than this machine has available."""


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident memory (since the last reset where there is one)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def available_memory_bytes() -> int:
    """Memory the OS can give this process now without swapping (psutil's `available`)."""
    import psutil

    return int(psutil.virtual_memory().available)


@contextlib.contextmanager
def measured() -> Iterator[dict]:
    """Time a step and record its peak resident memory into the yielded dict."""
    own_peak = _reset_peak()
    record: dict = {}
    t0 = time.perf_counter()
    try:
        yield record
    finally:
        record["seconds"] = round(time.perf_counter() - t0, 2)
        record["peak_rss_mb"] = round(peak_rss_bytes() / MB, 1)
        if not own_peak:
            record["peak_rss_scope"] = "process"  # no per-step reset on this OS


def require_memory(need: int, what: str, advice: str, available: int | None = None) -> None:
    """Refuse, in one line, a step whose estimated need exceeds the memory available now."""
    have = available_memory_bytes() if available is None else available
    if need > have:
        raise MemoryBudgetError(f"{what} needs about {need / 1e9:.1f} GB of memory and {have / 1e9:.1f} GB is "
                                f"available; {advice}")


def release_freed_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc's malloc_trim; a no-op elsewhere):
    after torch.onnx's export the freed graphs otherwise stay resident for the rest of the export."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass
