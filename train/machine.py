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


def choose_threads(requested: str = "auto", local_processes: int = 1) -> tuple[int, str]:
    """``(threads, reason)``: ``requested`` as an int, or for ``"auto"`` the idle cores per local process.

    ``"auto"`` keeps an explicit ``OMP_NUM_THREADS`` from the environment.
    """
    if requested != "auto":
        try:
            threads = int(requested)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"--threads: expected a positive integer or 'auto', got {requested!r}")
        return threads, "--threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores = cpu_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    idle = max(1, round(cores - load))
    threads = max(1, idle // max(1, local_processes))
    return threads, f"auto: {cores} cores, load average {load:.1f}; --threads N to override"


def set_threads(requested: str = "auto", local_processes: int = 1) -> str:
    """Set torch's intra-op thread count by ``choose_threads``; returns a one-line description of the choice."""
    threads, reason = choose_threads(requested, local_processes)
    torch.set_num_threads(threads)
    return f"threads: {threads} ({reason})"
