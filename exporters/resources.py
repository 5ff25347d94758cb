"""What an export step costs on this machine (wall time, peak resident memory), and whether the next
one fits in the memory left, asked before it starts rather than learned from the kernel's OOM killer.

    with measured() as cost:           # cost = {"seconds": 12.3, "peak_rss_mb": 812.0} afterwards
        build(...)
    require_memory(need_bytes, "INT8 calibration of model.onnx", "lower export.calibration_size ...")

Peak resident memory of a step is sampled (the process's resident set every 20 ms, on Linux) while it
runs: resetting the kernel's own high-water mark per step (/proc/self/clear_refs) would also hide the
process's true peak from `/usr/bin/time -v` and other outside tools. Elsewhere it is the peak since the
process started (getrusage), and says so.
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


def current_rss_bytes() -> int | None:
    """This process's resident memory now (Linux /proc), or None."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started (the kernel's high-water mark)."""
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
def measured(interval: float = 0.02) -> Iterator[dict]:
    """Time a step and record its peak resident memory (sampled while it runs) into the yielded dict."""
    import threading

    record: dict = {}
    start = current_rss_bytes()
    peak = [start or 0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            now = current_rss_bytes()
            if now is not None and now > peak[0]:
                peak[0] = now

    sampler = threading.Thread(target=sample, daemon=True) if start is not None else None
    if sampler is not None:
        sampler.start()
    t0 = time.perf_counter()
    try:
        yield record
    finally:
        record["seconds"] = round(time.perf_counter() - t0, 2)
        done.set()
        if sampler is not None:
            sampler.join()
            end = current_rss_bytes() or 0
            record["peak_rss_mb"] = round(max(peak[0], end) / MB, 1)
        else:
            record["peak_rss_mb"] = round(peak_rss_bytes() / MB, 1)
            record["peak_rss_scope"] = "process"  # no sampling on this OS: the peak since the process started


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
