"""PNG plots of A/B runs (matplotlib's object API on the Agg canvas: no display, no pyplot state).

``learning_curves``: train loss and validation metric against step, one colour per encoding (the mean
over seeds as a line, single seeds faint). ``ci_bars``: grouped bars with 95% bootstrap CI error bars
(final metric per encoding; patch shuffle). ``ci_lines``: a metric against a numeric axis (scale factor,
context multiple, data fraction), one line per series with CI error bars.
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

from train.stats import Interval

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


def _yerr(intervals: Sequence[Interval]) -> np.ndarray:
    """``(2, n)`` distances from the means down to ``low`` and up to ``high`` (matplotlib's asymmetric yerr)."""
    return np.array([[i.mean - i.low for i in intervals], [i.high - i.mean for i in intervals]])


def ci_bars(labels: Sequence[str], groups: dict[str, Sequence[Interval]], ylabel: str, title: str,
            path: str | Path) -> Path:  # fmt: skip
    """Bars per label, one bar per group (``groups[name][i]`` belongs to ``labels[i]``), CI error bars."""
    fig = Figure(figsize=(1.2 * len(labels) * max(1, len(groups) / 1.5) + 2.5, 4), layout="constrained")
    ax = fig.subplots()
    x, width = np.arange(len(labels)), 0.8 / len(groups)
    one = len(groups) == 1
    for k, (color, (name, intervals)) in enumerate(zip(_colors(len(groups)), groups.items(), strict=True)):
        colors = _colors(len(labels)) if one else color
        ax.bar(x + (k - (len(groups) - 1) / 2) * width, [i.mean for i in intervals], width, yerr=_yerr(intervals),
               capsize=3, color=colors, label=name)  # fmt: skip
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set(ylabel=ylabel, title=title)
    if not one:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
    return Path(path)


def ci_lines(series: dict[str, tuple[Sequence[float], Sequence[Interval]]], xlabel: str, ylabel: str, title: str,
             path: str | Path) -> Path:  # fmt: skip
    """One line per ``series[name] = (xs, intervals)`` with CI error bars.

    Names ``"encoding (mode)"`` share the encoding's colour; ``stretch`` lines are dashed.
    """
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    groups = list(dict.fromkeys(name.split(" (")[0] for name in series))
    colors = dict(zip(groups, _colors(len(groups)), strict=True))
    for name, (xs, intervals) in series.items():
        color = colors[name.split(" (")[0]]
        ax.errorbar(xs, [i.mean for i in intervals], yerr=_yerr(intervals), color=color, marker="o", capsize=3,
                    linestyle="--" if "stretch" in name else "-", label=name)  # fmt: skip
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return Path(path)


def _colors(n: int) -> list[tuple[float, ...]]:
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]
