"""Helpers shared by the benchmark harnesses: round-robin timing, autocast choice, tables, CLI, JSON."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

import liere
from train import markdown as tables
from train import run_dir


def registry_examples(num_axes: int) -> list[str]:
    """The example spec of every registered encoding that supports ``num_axes`` (``liere.encoding_info``)."""
    infos = [liere.encoding_info(name) for name in liere.available()]
    return [info.example for info in infos if num_axes in info.axes]


def default_size(device: torch.device) -> str:
    return "real" if device.type == "cuda" else "tiny"


def time_ms(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5) -> dict[str, float]:
    """Median wall time in milliseconds of each ``fns[name]()``, after one warm-up call each.

    The functions are timed round-robin, so machine noise hits all of them alike and their ratios stay
    meaningful on a shared machine. On CUDA, CUDA events time the device work.
    """
    cuda = device.type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(repeats + 1):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                fn()
                elapsed = (time.perf_counter() - t0) * 1e3
            if rep:  # rep 0 is the warm-up
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def autocast(device: torch.device, bf16: bool = False) -> AbstractContextManager:
    """bf16 autocast on CUDA, and on CPU when ``bf16``; else nothing (CPU rows are fp32 by default)."""
    on = device.type == "cuda" or bf16
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else nullcontext()


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """Markdown table of ``rows`` with ``(key, header)`` columns; floats printed with 3 significant digits."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.3g}"
        return "" if value is None else str(value)

    return tables.markdown_table([h for _, h in columns], ([cell(row.get(k)) for k, _ in columns] for row in rows))


def add_ratios(rows: list[dict], key: Callable[[dict], object], is_baseline: Callable[[dict], bool]) -> None:
    """Set ``<t>_ratio = <t>_ms / baseline <t>_ms`` for ``t`` in fwd/fwdbwd, the baseline sharing ``key(row)``."""
    base = {key(r): r for r in rows if is_baseline(r)}
    for r in rows:
        for t in ("fwd", "fwdbwd"):
            r[f"{t}_ratio"] = r[f"{t}_ms"] / base[key(r)][f"{t}_ms"]


def describe(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return f"{name}, torch {torch.__version__}"


def bench_parser(prog: str, description: str, sizes: Sequence[str], repeated: str) -> argparse.ArgumentParser:
    """The options both harnesses share: ``--device``, ``--size``, ``--repeats`` (of ``repeated``), ``--json``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if any)"
    )
    parser.add_argument("--size", choices=sizes, help="default: tiny on CPU, real on CUDA")
    parser.add_argument("--repeats", type=int, default=5, help=f"timed {repeated} (median reported)")
    parser.add_argument("--json", help="also write all rows to this JSON file")
    return parser


def run_metadata() -> dict[str, object]:
    """What a benchmark JSON records about its run: the exact command line, the device (the CPU unless the harness
    says otherwise), thread count, torch version, UTC date and the load average (1, 5, 15 min) at the end."""
    argv = getattr(sys, "orig_argv", sys.argv)  # the interpreter's own argv: ``python -m bench.x ...``
    return dict(
        command=shlex.join(["python", *argv[1:]]),
        device=describe(torch.device("cpu")),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        load_average=list(os.getloadavg()),
    )


def write_json(results: dict, path: str | None) -> None:
    """Write ``results`` and ``run_metadata()`` (keys ``results`` already has are kept) to ``path`` (nothing when
    None), atomically."""
    if path:
        run_dir.write_json(path, run_metadata() | results)


class RowPrinter:
    """Prints a markdown table as its rows come in: the header with the first rows, each line flushed."""

    def __init__(self, columns: Sequence[tuple[str, str]]) -> None:
        self.columns, self.started = columns, False

    def __call__(self, rows: Sequence[dict]) -> None:
        lines = markdown_table(rows, self.columns).split("\n")
        print("\n".join(lines[2:] if self.started else lines), flush=True)
        self.started = True
