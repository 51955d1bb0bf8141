"""This process as Linux's /proc sees it: resident memory, start time and the memory still available
(no torch, no Ray), and the one call that hands freed heap back to the machine.

One reader for what the study's trials report (``mem.*``, ``time.process``) and what
``bench/bench_distill.py`` measures (peak and current resident set), so both count alike.
Off Linux the readers give nothing (or nan) rather than fail.
"""
from __future__ import annotations

import os
import time
from pathlib import Path


def status_mb(field: str = "VmHWM") -> float | None:
    """A memory field of ``/proc/self/status`` in MiB: ``VmHWM`` the peak resident set (since
    :func:`reset_peak_memory`), ``VmRSS`` the current one; None where there is no such field."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def meminfo_mb(field: str) -> float | None:
    """A field of ``/proc/meminfo`` in MiB (``MemAvailable``: what the machine can still give,
    ``MemTotal``: all it has); None off Linux."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def release_freed_memory() -> bool:
    """Hand the heap that freed tensors leave behind back to the machine (glibc's ``malloc_trim``).
    glibc keeps freed memory mapped for reuse, so a worker that ran an MTT trial (~3 GiB of unrolled
    steps at CIFAR-10 IPC 10, all freed by its end) went on holding that much: its next trial, a
    neighbouring one and the MTT memory check saw the machine short of it. False where there is no
    glibc (another libc, another OS)."""
    import ctypes
    import ctypes.util

    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def reset_peak_memory() -> None:
    """Start this process's peak resident set (``VmHWM``) afresh: a trial's worker process may have
    run earlier trials of the study (Tune reuses it), whose peaks are not this trial's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def memory_mb() -> dict[str, float]:
    """This process's peak resident set (since :func:`reset_peak_memory`) and current private
    memory (MiB), from /proc (Linux).
    Pages mapped from the object store are shared, so ``mem.private_mb`` (a trial keeps its largest
    value seen during distillation) shows what a trial holds of its own."""
    out = {}
    peak = status_mb("VmHWM")
    if peak is not None:
        out["mem.peak_rss_mb"] = peak
    try:
        private = 0
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                private += int(line.split()[1])
        out["mem.private_mb"] = private / 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def process_start_time() -> float:
    """When this process started (unix time, to ~10 ms; nan off Linux): a trial's worker start-up
    is the time from it to the trial function's first line."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")
