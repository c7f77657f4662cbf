"""Progress and metrics of a training run: the progress bar or lines on rank 0, and ``metrics.jsonl`` (plus
TensorBoard scalars when tensorboard is installed)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from train import run_dir as layout
from train.presets import RunConfig

TIMING_WARMUP = 5  # first steps of a process left out of the mean step time (allocation, compilation)
PROGRESS_EVERY_S = 30.0  # progress line interval when stderr is not a terminal (no progress bar)

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # tensorboard is optional
    SummaryWriter = None


class MetricsLog:
    """JSONL metrics (and TensorBoard scalars when available); on resume drops records past the checkpoint
    (and a torn last line, with a warning)."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool) -> None:
        self.path, self.enabled, self.writer = run_dir / layout.METRICS, enabled, None
        if not enabled:
            return
        kept = [r for r in layout.read_jsonl(self.path) if r.get("step", 0) <= start_step] if self.path.exists() else []
        layout.write_text(self.path, "".join(json_line(r) for r in kept))
        if SummaryWriter is not None:
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (must contain ``step``)."""
        if not self.enabled:
            return
        layout.append_text(self.path, json_line(record))
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def json_line(record: dict[str, Any]) -> str:
    """One JSONL line."""
    return json.dumps(record) + "\n"


def format_duration(seconds: float) -> str:
    """``"4m05s"``, or ``"1h07m"`` from an hour up."""
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Progress of one run on rank 0: a tqdm bar on a terminal; otherwise one line every ``PROGRESS_EVERY_S``
    seconds (step, loss, ms/step, ETA) and, after the first steps, an estimate of the time left."""

    def __init__(self, config: RunConfig, start: int, enabled: bool, bars: bool = True) -> None:
        self.name, self.total, self.start = f"{config.task} {config.encoding} s{config.seed}", config.steps, start
        tty = bars and sys.stderr.isatty()
        self.bar = tqdm(
            total=config.steps, initial=start, disable=not (enabled and tty), desc=self.name, dynamic_ncols=True
        )
        self.lines = enabled and not tty
        self.t0 = self.last = time.perf_counter()
        self.estimated, self.loss = False, float("nan")

    def update(self, step: int, loss: float | None = None) -> None:
        self.bar.update(1)
        self.loss = self.loss if loss is None else loss
        if not self.lines:
            return
        now, done = time.perf_counter(), step - self.start
        per_step = (now - self.t0) / done
        eta = format_duration(per_step * (self.total - step))
        if not self.estimated and done == 2 * TIMING_WARMUP and step < self.total:
            self.estimated = True
            print(
                f"[train] {self.name}: {1000 * per_step:.0f} ms/step over the first {done} steps, "
                f"about {eta} left for {self.total - step} steps (plus evaluations)",
                flush=True,
            )
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            print(
                f"[train] {self.name}: step {step}/{self.total}, loss {self.loss:.4f}, "
                f"{1000 * per_step:.0f} ms/step, ETA {eta}",
                flush=True,
            )

    def postfix(self, **values: str) -> None:
        self.bar.set_postfix(**values)

    def close(self) -> None:
        self.bar.close()
