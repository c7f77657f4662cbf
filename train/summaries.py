"""Typed summaries passed between the loop, the A/B runner, the evaluations and the report.

``RunSummary`` is one run's ``summary.json``; ``AbRun`` adds where the run sits in an A/B folder;
``AbResults`` is the A/B folder's ``results.json``. ``from_dict`` reads files written by older versions
(fields added since get their defaults) and raises ``RunFolderError`` naming the file when a required field
is missing; ``to_dict`` gives the JSON written to disk.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from train.run_dir import RESULTS_JSON, RunFolderError, read_json

T = TypeVar("T")


def _from_dict(cls: type[T], data: Any, source: str | Path) -> T:
    """An instance of dataclass ``cls`` from ``data``; unknown keys are ignored, missing required ones named."""
    if not isinstance(data, dict):
        raise RunFolderError(f"{source}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    required = [
        n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing := [n for n in required if n not in data]:
        raise RunFolderError(f"{source} is missing {missing}: not a file written by train (or an incomplete one)")
    return cls(**{k: v for k, v in data.items() if k in fields})


@dataclass
class Divergence:
    """Where a run stopped on a non-finite loss or gradient, and the last good checkpoint before it."""

    step: int
    loss: float
    grad_norm: float
    checkpoint: str | None = None
    checkpoint_step: int | None = None
    cause: str = ""

    def message(self) -> str:
        where = (
            f"last good checkpoint: {self.checkpoint} (step {self.checkpoint_step})"
            if self.checkpoint
            else "no checkpoint was written before it"
        )
        cause = f" ({self.cause})" if self.cause else ""
        return (
            f"training diverged at step {self.step}: loss {self.loss}, gradient norm {self.grad_norm}{cause}; "
            f"{where}. Lower --lr, or pass --on-nonfinite skip to skip such steps"
        )


@dataclass
class RunSummary:
    """The summary of one finished (or diverged) training run (``summary.json``)."""

    config: dict[str, Any]
    config_hash: str
    model_spec: dict[str, Any]
    checkpoint: str
    metric: str
    higher_is_better: bool
    final_loss: float | None
    val: dict[str, float]
    test: dict[str, float]
    params: int
    state_sha256: str
    step_time_ms: float
    peak_memory_mb: float
    peak_memory_kind: str
    steps: int
    world_size: int
    device: str
    data_source: str
    wall_time_s: float
    diverged: dict[str, Any] | None = None  # a ``Divergence`` as a dict; then ``test`` is empty
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient (--on-nonfinite skip)
    threads: int | None = None  # torch intra-op threads of the process that finished the run

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = "summary") -> RunSummary:
        return _from_dict(cls, data, source)

    @classmethod
    def load(cls, path: str | Path) -> RunSummary:
        return cls.from_dict(read_json(path), path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def test_value(self) -> float | None:
        """The final test metric, or None for a diverged run."""
        return None if self.diverged else self.test.get(self.metric)


@dataclass
class AbRun(RunSummary):
    """A run of an A/B folder: its summary plus the encoding, seed and fraction, with paths relative to the folder."""

    encoding: str = ""
    seed: int = 0
    fraction: float = 1.0
    run_dir: str = ""
    metrics_log: str = ""

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = "results run") -> AbRun:
        run = _from_dict(cls, data, source)
        if not run.encoding or not run.run_dir:
            raise RunFolderError(f"{source}: an A/B run needs 'encoding' and 'run_dir'")
        folder = run.run_dir
        if not isinstance(folder, str) or PurePosixPath(folder).parts != (folder,) or folder == "..":
            raise RunFolderError(f"{source}: run_dir {run.run_dir!r} must name a folder inside the A/B folder")
        for name in ("checkpoint", "metrics_log"):
            path = getattr(run, name)
            parts = PurePosixPath(path).parts if isinstance(path, str) else ()
            if path and (parts[:1] != (run.run_dir,) or ".." in parts):
                raise RunFolderError(f"{source}: {name} {path!r} must be a file inside its run folder {run.run_dir!r}")
        return run


@dataclass
class AbResults:
    """An A/B folder's ``results.json``: settings, every run, the summary rows and the markdown table."""

    task: str
    encodings: list[str]
    seeds: list[int]
    metric: str
    higher_is_better: bool
    data_source: str
    device: str
    runs: list[AbRun]
    wall_time_s: float
    preset: str = "?"
    fractions: list[float] = field(default_factory=lambda: [1.0])
    evaluations: list[str] = field(default_factory=list)
    world_size: int = 1
    torch_version: str = "?"
    base_config: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    jobs: int = 1
    cpu: str | None = None
    data_sizes: dict[str, int] = field(default_factory=dict)  # train/val/test, counted in data_unit
    data_unit: str = ""  # "images" or "chars" (char-level text: one token per character)
    scored: dict[str, Any] = field(default_factory=dict)  # train.ab.report.scored_counts
    summary: list[dict[str, Any]] = field(default_factory=list)
    table: str = ""

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = "results") -> AbResults:
        results = _from_dict(cls, data, source)
        results.runs = [AbRun.from_dict(r, f"{source} (run {i})") for i, r in enumerate(results.runs)]
        if not results.runs:
            raise RunFolderError(f"{source} lists no runs; rerun train.ab into this folder with --resume")
        return results

    @classmethod
    def load(cls, folder: str | Path) -> AbResults:
        """``results.json`` of the A/B folder ``folder``; ``RunFolderError`` saying what is wrong otherwise."""
        path = Path(folder) / RESULTS_JSON
        if not Path(folder).is_dir():
            raise RunFolderError(f"{folder} is not a folder; pass an A/B run folder written by python -m train.ab")
        if not path.is_file():
            raise RunFolderError(
                f"{folder} has no {RESULTS_JSON}: not a train.ab folder, or its run did not finish "
                "(continue it with python -m train.ab --out FOLDER --resume)"
            )
        results = cls.from_dict(read_json(path), path)
        root = Path(folder).resolve()
        for run in results.runs:
            if not (Path(folder) / run.run_dir).resolve().is_relative_to(root):
                raise RunFolderError(f"{path}: run folder {run.run_dir!r} is a link out of {folder}; refused")
        return results

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def main_fraction(self) -> float:
        """The training fraction of the main table's runs (the largest of ``--data-fractions``)."""
        return max(r.fraction for r in self.runs)

    def main_runs(self) -> list[AbRun]:
        """Runs trained on the main fraction, in results order."""
        return [r for r in self.runs if r.fraction == self.main_fraction]
