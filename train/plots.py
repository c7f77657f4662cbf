"""PNG plots of A/B runs (matplotlib's object API on the Agg canvas: no display, no pyplot state).

``learning_curves``: train loss and validation metric against step, one colour per encoding (the mean
over seeds as a line, single seeds faint). ``final_metric_bars``: the final metric per encoding with
error bars (standard deviation over seeds).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

METRIC_LABELS = {"accuracy": "accuracy", "bpc": "bits per character"}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(r["step"], r[key]) for r in records if key in r]
    return (np.array([s for s, _ in rows]), np.array([v for _, v in rows])) if rows else (np.zeros(0), np.zeros(0))


def learning_curves(runs: Sequence[dict[str, Any]], metric: str, path: str | Path) -> Path:
    """Two panels (train loss, val ``metric``) vs step; ``runs`` items have ``encoding`` and ``metrics_log``."""
    by_encoding: dict[str, list[list[dict[str, Any]]]] = defaultdict(list)
    for run in runs:
        by_encoding[run["encoding"]].append(read_jsonl(run["metrics_log"]))
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for color, (encoding, logs) in zip(_colors(len(by_encoding)), by_encoding.items(), strict=True):
        for ax, key in zip(axes, ("loss", f"val_{metric}"), strict=True):
            curves = [_series(records, key) for records in logs]
            for steps, values in curves if len(curves) > 1 else []:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            length = min(len(steps) for steps, _ in curves)
            mean = np.mean([values[:length] for _, values in curves], axis=0)
            ax.plot(curves[0][0][:length], mean, color=color, label=encoding, linewidth=1.6)
    axes[0].set(xlabel="step", ylabel="train loss", title="training loss")
    axes[1].set(xlabel="step", ylabel=f"val {METRIC_LABELS.get(metric, metric)}", title=f"validation {metric}")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)


def final_metric_bars(rows: Sequence[dict[str, Any]], metric: str, split: str, path: str | Path) -> Path:
    """Bar per encoding of ``rows`` items' ``mean`` with ``std`` error bars (``metric`` on ``split``)."""
    fig = Figure(figsize=(1.2 * len(rows) + 2.5, 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(rows))
    ax.bar(x, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4, color=_colors(len(rows)))
    ax.set_xticks(x, [r["encoding"] for r in rows], rotation=20, ha="right")
    ax.set(ylabel=f"{split} {METRIC_LABELS.get(metric, metric)}", title=f"final {split} {metric} (± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
    return Path(path)


def _colors(n: int) -> list[tuple[float, ...]]:
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]
