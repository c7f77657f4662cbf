"""PNG plots of A/B runs (matplotlib's object API on the Agg canvas: no display, no pyplot state).

Each plot answers its question at a glance: accuracy is drawn in percent from 0 with the chance level as a
dashed line; bits per character as points on an axis zoomed to the values (differences of 0.01 matter), each
value written next to its point; 95% CIs (error bars, bands) and the words "95% CI" appear only when there
are at least two seeds; x ticks sit only at the evaluated values.

``learning_curves``: train loss and validation metric against step, one colour per encoding (the mean over
seeds as a line, single seeds faint). ``ci_bars``: the metric per label, one bar (or point) per group (final
metric per encoding; patch shuffle). ``ci_lines``: the metric against an evaluated axis (scale factor, context
multiple, data fraction), one line per series, one panel per coordinate mode. Each saves a PNG at ``path``
and returns its figure.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from matplotlib.transforms import ScaledTranslation

from train import run_dir as layout
from train.ab.stats import Interval

_LABEL_BOX = {"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.8, "linewidth": 0}
Series = dict[str, tuple[Sequence[float], Sequence[Interval]]]  # name -> (xs, intervals)


@dataclass(frozen=True)
class MetricAxis:
    """How a metric is drawn: axis label, factor and unit of values, digits of annotations, axis range.

    ``top``: the largest possible value (after ``scale``) for a metric drawn from zero, else None (zoomed).
    """

    label: str
    scale: float = 1.0
    unit: str = ""
    digits: int = 3
    top: float | None = None


METRICS = {
    "accuracy": MetricAxis("accuracy (%)", scale=100.0, unit="%", digits=1, top=100.0),
    "bpc": MetricAxis("bits per character (lower is better)"),
}


def metric_axis(metric: str) -> MetricAxis:
    """The drawing of ``metric`` (an unknown metric: its name, raw values, axis zoomed to the data)."""
    return METRICS.get(metric, MetricAxis(metric))


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(r["step"], r[key]) for r in records if key in r]
    return (np.array([s for s, _ in rows]), np.array([v for _, v in rows])) if rows else (np.zeros(0), np.zeros(0))


def learning_curves(runs: Sequence[dict[str, Any]], metric: str, path: str | Path, chance: float | None = None
                    ) -> Figure:  # fmt: skip
    """Two panels (train loss, val ``metric``) vs step; ``runs`` items have ``encoding`` and ``metrics_log``.

    ``chance``: accuracy of guessing (``1 / num_classes``), drawn dashed on the validation panel.
    """
    by_encoding: dict[str, list[list[dict[str, Any]]]] = defaultdict(list)
    for run in runs:
        by_encoding[run["encoding"]].append(layout.read_jsonl(run["metrics_log"]))
    axis = metric_axis(metric)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for color, (encoding, logs) in zip(_colors(len(by_encoding)), by_encoding.items(), strict=True):
        for ax, key, scale in zip(axes, ("loss", f"val_{metric}"), (1.0, axis.scale), strict=True):
            curves = [_series(records, key) for records in logs]
            for steps, values in curves if len(curves) > 1 else []:
                ax.plot(steps, scale * values, color=color, alpha=0.25, linewidth=0.8)
            length = min(len(steps) for steps, _ in curves)
            mean = np.mean([values[:length] for _, values in curves], axis=0)
            ax.plot(curves[0][0][:length], scale * mean, color=color, label=encoding, linewidth=1.6,
                    marker="o" if length < 3 else None)  # fmt: skip
    seeds = _seeds_note([len(logs) for logs in by_encoding.values()], ci=False)
    axes[0].set(xlabel="step", ylabel="train loss", title=f"training loss ({seeds})")
    axes[1].set(xlabel="step", ylabel=f"validation {axis.label}", title=f"validation {metric} ({seeds})")
    _chance_line(axes[1], chance, axis)
    if axis.top is not None:
        axes[1].set_ylim(0, 1.04 * axis.top)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    layout.write_figure(fig, path, dpi=120)
    return fig


def ci_bars(labels: Sequence[str], groups: dict[str, Sequence[Interval]], metric: str, title: str,
            path: str | Path, chance: float | None = None) -> Figure:  # fmt: skip
    """The metric per label, one mark per group (``groups[name][i]`` belongs to ``labels[i]``), value written on it.

    Metrics drawn from zero (accuracy) are bars with the ``chance`` level dashed; others (bits per character)
    are points on an axis zoomed to the values. Error bars: 95% CI, only with at least two seeds.
    """
    axis = metric_axis(metric)
    fig = Figure(figsize=(1.1 * len(labels) * max(1, len(groups) / 1.5) + 2.5, 4.2), layout="constrained")
    ax = fig.subplots()
    x, width = np.arange(len(labels)), 0.8 / len(groups)
    one = len(groups) == 1
    seeds = [i.n for intervals in groups.values() for i in intervals]
    ci = min(seeds) >= 2
    for k, (color, (name, intervals)) in enumerate(zip(_colors(len(groups)), groups.items(), strict=True)):
        xs, means = x + (k - (len(groups) - 1) / 2) * width, [axis.scale * i.mean for i in intervals]
        yerr = axis.scale * _yerr(intervals) if ci else None
        colors = _colors(len(labels)) if one else [color] * len(labels)
        texts = [f"{m:.{axis.digits}f}" for m in means]
        if axis.top is not None:
            ax.bar(xs, means, width, yerr=yerr, capsize=3, color=colors, label=None if one else name)
            for xi, text in zip(xs, texts, strict=True):  # at the foot of the bar, clear of the error bar's top
                ax.text(xi, 0.015 * axis.top, text, ha="center", va="bottom", fontsize=8 if one else 7, zorder=5,
                        bbox=_LABEL_BOX)  # fmt: skip
            continue
        for xi, mean, err, c, text in zip(xs, means, _columns(yerr, len(means)), colors, texts, strict=True):
            ax.errorbar(xi, mean, yerr=err, fmt="o", markersize=7, capsize=4, color=c,
                        label=name if xi == xs[0] and not one else None)  # fmt: skip
            ax.annotate(text, (xi, mean), xytext=(8, 0), textcoords="offset points", va="center", fontsize=8)
    if axis.top is not None:
        ax.set_ylim(0, 1.08 * axis.top)
    else:
        ax.margins(x=0.12, y=0.15)
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set(ylabel=f"test {axis.label}", title=f"{title} ({_seeds_note(seeds, ci)})")
    _chance_line(ax, chance, axis)
    if not one or chance is not None:
        fig.legend(loc="outside right center", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    layout.write_figure(fig, path, dpi=120)
    return fig


def ci_lines(panels: dict[str, Series], xlabel: str, metric: str, title: str, path: str | Path, *,
             chance: float | None = None, xticklabels: dict[float, str] | None = None, log_x: bool = False
             ) -> Figure:  # fmt: skip
    """The metric against evaluated x values: one panel per ``panels[name]``, one line per series name.

    A series keeps its colour across panels and appears once in the legend; the 95% CI is a band (at least
    two seeds). Ticks only at the evaluated x values, labelled by ``xticklabels`` (default ``f"{x:g}"``).
    """
    axis = metric_axis(metric)
    names = list(dict.fromkeys(name for series in panels.values() for name in series))
    colors = dict(zip(names, _colors(len(names)), strict=True))
    fig = Figure(figsize=(4.6 * len(panels) + 1.8, 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True, squeeze=False)[0])
    seeds = [i.n for series in panels.values() for _, intervals in series.values() for i in intervals]
    ci = min(seeds) >= 2
    for ax, (panel, series) in zip(axes, panels.items(), strict=True):
        xs_seen: set[float] = set()
        for k, (name, (xs, intervals)) in enumerate(series.items()):
            xs_seen |= set(xs)
            # dodge: each series shifted a few points sideways, so equal values (all at 100%) stay visible
            shift = ax.transData + ScaledTranslation((k - (len(series) - 1) / 2) * 4 / 72, 0, fig.dpi_scale_trans)
            ax.plot(xs, [axis.scale * i.mean for i in intervals], color=colors[name], marker="o", markersize=5,
                    label=name, transform=shift)  # fmt: skip
            if ci:
                ax.fill_between(xs, [axis.scale * i.low for i in intervals], [axis.scale * i.high for i in intervals],
                                color=colors[name], alpha=0.12, linewidth=0, transform=shift)  # fmt: skip
        ticks = sorted(xs_seen)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlim(*_padded(ticks[0], ticks[-1], log_x))  # shifted artists do not autoscale the axes
        ax.set_xticks(ticks, [(xticklabels or {}).get(t, f"{t:g}") for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())  # log axes add unlabelled ones
        ax.set(xlabel=xlabel, title=panel)
        ax.grid(alpha=0.3)
        _chance_line(ax, chance, axis)
    values = [axis.scale * v for series in panels.values() for _, intervals in series.values() for i in intervals
              for v in ((i.low, i.high) if ci else (i.mean,))]  # fmt: skip
    axes[0].set_ylim(*((0, 1.04 * axis.top) if axis.top is not None else _padded(min(values), max(values), False)))
    axes[0].set_ylabel(f"test {axis.label}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle(f"{title} ({_seeds_note(seeds, ci)})")
    layout.write_figure(fig, path, dpi=120)
    return fig


def _padded(low: float, high: float, log: bool, pad: float = 0.08) -> tuple[float, float]:
    """``[low, high]`` widened by ``pad`` of its span on each side (in log space for a log axis)."""
    if log:
        low, high = _padded(np.log10(low), np.log10(high), False, pad)
        return 10**low, 10**high
    span = (high - low) or abs(high) or 1.0
    return low - pad * span, high + pad * span


def _chance_line(ax: Axes, chance: float | None, axis: MetricAxis) -> None:
    """Dashed horizontal line at the chance level, labelled for the legend."""
    if chance is not None:
        ax.axhline(axis.scale * chance, color="0.35", linestyle="--", linewidth=1.2,
                   label=f"chance ({axis.scale * chance:.3g}{axis.unit})")  # fmt: skip


def _seeds_note(seeds: Sequence[int], ci: bool) -> str:
    """``"mean and 95% CI over 3 seeds"``, ``"1 seed"``, ``"mean over 2-3 seeds"``..."""
    low, high = min(seeds), max(seeds)
    count = f"{low} seed{'s' if high > 1 else ''}" if low == high else f"{low}-{high} seeds"
    if high == 1:
        return count
    return f"mean and 95% CI over {count}" if ci else f"mean over {count}"


def _yerr(intervals: Sequence[Interval]) -> np.ndarray:
    """``(2, n)`` distances from the means down to ``low`` and up to ``high`` (matplotlib's asymmetric yerr)."""
    return np.array([[i.mean - i.low for i in intervals], [i.high - i.mean for i in intervals]])


def _columns(yerr: np.ndarray | None, n: int) -> list[np.ndarray | None]:
    """Per point, its ``(2, 1)`` slice of an asymmetric yerr (None without error bars)."""
    return [None] * n if yerr is None else [yerr[:, i : i + 1] for i in range(n)]


def _colors(n: int) -> list[tuple[float, ...]]:
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]
