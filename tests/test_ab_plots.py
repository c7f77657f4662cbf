"""train.ab.plots on small synthetic results (1 and 3 seeds; accuracy and bits per character): what each plot shows."""

from __future__ import annotations

import json

import pytest
from matplotlib.container import ErrorbarContainer

from train.ab import plots
from train.ab.stats import Interval, bootstrap_ci

ENCODINGS = ["rope", "rope-mixed", "liere8"]


def intervals(means: list[float], seeds: int) -> list[Interval]:
    """Per mean, the bootstrap CI of ``seeds`` values spread by +-0.01 around it (one seed: the mean itself)."""
    spread = [0.0] if seeds == 1 else [-0.01, 0.0, 0.01][:seeds]
    return [bootstrap_ci([m + d for d in spread]) for m in means]


def chance_lines(ax) -> list:
    return [line for line in ax.get_lines() if line.get_label().startswith("chance")]


def error_bars(ax) -> list:
    """Error-bar containers (of bars or of points) that draw vertical error bars."""
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.has_yerr]


@pytest.mark.parametrize("seeds", [1, 3])
def test_accuracy_bars_start_at_zero_with_chance_line_and_ci_only_over_seeds(tmp_path, seeds):
    fig = plots.ci_bars(ENCODINGS, {"test": intervals([0.5, 0.9, 0.95], seeds)}, "accuracy", "final test accuracy",
                        tmp_path / "final.png", chance=1 / 8)  # fmt: skip
    ax = fig.axes[0]
    assert (tmp_path / "final.png").stat().st_size > 0
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 100  # percent, from zero
    [chance] = chance_lines(ax)
    assert chance.get_linestyle() == "--" and list(chance.get_ydata()) == [12.5, 12.5]
    assert chance.get_label() == "chance (12.5%)"
    assert {t.get_text() for t in ax.texts} >= {"50.0", "90.0", "95.0"}  # each value written on its bar
    title = ax.get_title()
    if seeds == 1:
        assert "CI" not in title and "1 seed" in title and not error_bars(ax)
    else:
        assert "95% CI over 3 seeds" in title and len(error_bars(ax)) == 1


@pytest.mark.parametrize("seeds", [1, 3])
def test_bpc_points_on_zoomed_axis_with_values(tmp_path, seeds):
    means = [2.304, 2.292, 2.314]
    fig = plots.ci_bars(ENCODINGS, {"test": intervals(means, seeds)}, "bpc", "final test bpc", tmp_path / "bpc.png")
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert 2.2 < low < min(means) - (0.01 if seeds > 1 else 0) and max(means) < high < 2.4  # zoomed, not from 0
    assert high - low < 0.2  # a 0.01 difference is a visible fraction of the axis
    assert {t.get_text() for t in ax.texts} == {"2.304", "2.292", "2.314"}
    assert not chance_lines(ax) and ("CI" in ax.get_title()) == (seeds > 1)
    assert len(error_bars(ax)) == (len(means) if seeds > 1 else 0)


@pytest.mark.parametrize("seeds", [1, 3])
def test_extrapolation_panels_ticks_at_evaluated_scales_one_legend(tmp_path, seeds):
    factors = [1.0, 1.5, 2.0]
    panels = {f"{mode} coordinates": {e: (factors, intervals([0.9, 0.6, 0.3], seeds)) for e in ENCODINGS}
              for mode in ("index", "stretch")}  # fmt: skip
    fig = plots.ci_lines(panels, "scale factor", "accuracy", "extrapolation", tmp_path / "x.png", chance=0.1,
                         xticklabels={f: f"{f:g}x" for f in factors})  # fmt: skip
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["index coordinates", "stretch coordinates"]
    for ax in axes:
        assert list(ax.get_xticks()) == factors and [t.get_text() for t in ax.get_xticklabels()] == ["1x", "1.5x", "2x"]
        assert not ax.get_xticks(minor=True).size
        assert len(chance_lines(ax)) == 1 and ax.get_ylim()[0] == 0
        assert ax.get_legend() is None
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [*ENCODINGS, "chance (10%)"]  # once per encoding
    assert ("95% CI over 3 seeds" in fig.get_suptitle()) == (seeds == 3) and ("CI" in fig.get_suptitle()) == (seeds > 1)
    assert len(axes[0].collections) == (len(ENCODINGS) if seeds > 1 else 0)  # CI bands


def test_length_plot_log_axis_ticks_only_at_multiples_no_chance(tmp_path):
    multiples = [1, 2, 4]
    series = {e: (multiples, intervals([2.4, 2.5, 2.7], 3)) for e in ENCODINGS}
    fig = plots.ci_lines({"": series}, "multiple", "bpc", "length", tmp_path / "length.png",
                         xticklabels={1: "1x", 2: "2x", 4: "4x"}, log_x=True)  # fmt: skip
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == multiples and not ax.get_xticks(minor=True).size
    assert ax.get_ylim()[0] > 2 and not chance_lines(ax)


def test_learning_curves_chance_on_validation_panel(tmp_path):
    runs = []
    for seed in (0, 1):
        log = tmp_path / f"s{seed}.jsonl"
        log.write_text("\n".join(json.dumps({"step": s, "loss": 2 - s / 10, "val_accuracy": s / 10}) for s in range(5)))
        runs.append({"encoding": "liere8", "metrics_log": log})
    fig = plots.learning_curves(runs, "accuracy", tmp_path / "curves.png", chance=0.25)
    loss, val = fig.axes
    assert not chance_lines(loss) and [list(c.get_ydata()) for c in chance_lines(val)] == [[25.0, 25.0]]
    [mean] = [line for line in val.get_lines() if line.get_label() == "liere8"]
    assert max(mean.get_ydata()) == pytest.approx(40.0)  # validation accuracy in percent
    assert "2 seeds" in val.get_title() and "CI" not in val.get_title()
