"""The machine a run is on: CPU model, core count, load, and the torch thread count chosen from them.

On a CPU shared with another busy process, torch's default of one thread per core makes its threads wait
for each other: on a 2-core machine with one other CPU-bound job a training step ran 5x slower with 2
threads than with 1. ``choose_threads`` therefore uses the cores that are idle now (cores minus the
1-minute load average, at least 1), shared among the processes of this machine's ranks.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``), or ``"unknown"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def idle_cores() -> tuple[int, str]:
    """``(cores, reason)``: the cores idle now (cores minus the 1-minute load average, at least 1)."""
    cores = cpu_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, round(cores - load)), f"{cores} cores, load average {load:.1f}"


def _positive(requested: str, option: str) -> int:
    try:
        value = int(requested)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{option}: expected a positive integer or 'auto', got {requested!r}")
    return value


def _omp_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def plan_jobs(jobs: str, threads: str, runs: int) -> tuple[int, int, str]:
    """``(jobs, threads, line)``: how many CPU runs to train at once, each in its own process, and the torch
    threads of each.

    By default (both ``"auto"``) every run gets 1 thread and as many run at once as cores are idle, so a
    run's numbers do not depend on the machine's core count (1-thread runs are bitwise reproducible) and
    small models, which gain little from a second thread, use every core. An explicit ``threads`` (or
    ``OMP_NUM_THREADS``) is kept and the idle cores are shared among jobs of that many threads.
    """
    idle, reason = idle_cores()
    fixed = None if threads == "auto" else _positive(threads, "--threads")
    fixed = fixed or _omp_threads()
    if jobs == "auto":
        per_run = fixed or 1
        count = max(1, min(runs, idle // per_run))
    else:
        count = _positive(jobs, "--jobs")
        per_run = fixed or max(1, idle // count)
    line = f"runs at once: {count}, threads per run: {per_run} ({reason}; --jobs N / --threads N to override)"
    return count, per_run, line


def choose_threads(requested: str = "auto", local_processes: int = 1) -> tuple[int, str]:
    """``(threads, reason)``: ``requested`` as an int, or for ``"auto"`` the idle cores per local process.

    ``"auto"`` keeps an explicit ``OMP_NUM_THREADS`` from the environment.
    """
    if requested != "auto":
        return _positive(requested, "--threads"), "--threads"
    if omp := _omp_threads():
        return omp, "OMP_NUM_THREADS"
    idle, reason = idle_cores()
    threads = max(1, idle // max(1, local_processes))
    return threads, f"auto: {reason}; --threads N to override"


def set_threads(requested: str = "auto", local_processes: int = 1) -> str:
    """Set torch's intra-op thread count by ``choose_threads``; returns a one-line description of the choice."""
    threads, reason = choose_threads(requested, local_processes)
    torch.set_num_threads(threads)
    return f"threads: {threads} ({reason})"
