"""A look inside trained rotary encodings with learned generators (LieRE, RoPE-Mixed, STRING, ComRoPE).

    python -m train.ab.inspect RUN_DIR       # a train.ab folder (results.json) or one run's folder (last.pt)

For every layer and head of each model whose encoding has ``skew_generators()`` (``R(p) = exp(sum_a p_a A_a)``):

- **commutator size** ``|[A_a, A_b]|_F / (|A_a|_F |A_b|_F)`` for every axis pair: 0 when the generators
  commute (RoPE-Mixed-like: ``R(p)^T R(p')`` depends on ``p' - p`` only), larger when the model uses LieRE's
  extra freedom;
- **rotation frequencies** per axis: the generators' eigenvalues ``± i w`` (``w`` in radians per unit of
  coordinate, the model's own coordinates);
- **relative-position kernel** ``K(p, p') = E <R(p) q, R(p') q> = tr(R(p)^T R(p')) / head_dim``: the exact
  average over random isotropic ``q = k`` (not the model's own q/k), on the training grid, for a query at the
  centre and at a corner, and its **translation-invariance error**: the largest difference between the two
  kernels at the same offset ``p' - p`` (0 for commuting generators).

Writes ``inspect.md`` and PNGs (``inspect_<run>.png``: kernels and frequencies; ``commutator_steps.png``: the
commutator logged during training, see ``liere.analysis.position_metrics``) into the folder. ``train.ab.report``
appends the markdown section to ``report.md``. The generator math itself lives in ``liere.analysis``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from liere.analysis import axis_pairs, commutator_sizes, frequencies, generators
from train import run_checkpoint
from train import run_dir as layout
from train.ab.stats import spearman
from train.summaries import AbResults

OUTPUT = "inspect.md"


def rotations(gens: Tensor, coords: Tensor) -> Tensor:
    """``R(p) = exp(sum_a p_a A_a)`` for ``coords`` ``(n, axes)``: ``(depth, heads, n, d, d)``."""
    return torch.linalg.matrix_exp(torch.einsum("na,dhaij->dhnij", coords.to(gens), gens).contiguous())


def kernel(gens: Tensor, coords: Tensor, query: int) -> Tensor:
    """``tr(R(p)^T R(p')) / d`` for ``p = coords[query]`` and every ``p'``: ``(depth, heads, n)``."""
    R = rotations(gens, coords)
    return torch.einsum("dhij,dhnij->dhn", R[:, :, query], R) / gens.shape[-1]


def invariance_error(gens: Tensor, coords: Tensor, grid: Sequence[int], a: int, b: int) -> Tensor:
    """Largest ``|K(p_a, p_a + δ) - K(p_b, p_b + δ)|`` over offsets ``δ`` on the grid from both: ``(depth, heads)``.

    ``a``, ``b``: query indices into the row-major ``grid``; 0 when ``R(p)^T R(p')`` depends on ``p' - p`` only.
    """
    index = np.arange(int(np.prod(grid))).reshape(grid)
    pa, pb = np.unravel_index(a, grid), np.unravel_index(b, grid)
    ka, kb = kernel(gens, coords, a), kernel(gens, coords, b)
    errors = []
    for target in np.ndindex(*grid):
        shifted = tuple(t - x + y for t, x, y in zip(target, pa, pb, strict=True))
        if all(0 <= s < g for s, g in zip(shifted, grid, strict=True)):
            errors.append((ka[..., index[target]] - kb[..., index[shifted]]).abs())
    return torch.stack(errors, -1).amax(-1)


def inspect_model(model: nn.Module) -> dict[str, Any] | None:
    """Commutators, frequencies, kernels and invariance errors of a trained ViT on its training grid (None when
    its encoding has no generators)."""
    gens = generators(model)
    grid = tuple(getattr(model, "train_grid", ()))
    if gens is None or not grid:
        return None
    coords = model.coords(grid).double()
    n, centre = len(coords), int(np.ravel_multi_index(tuple(g // 2 for g in grid), grid))
    return {
        "grid": grid,
        "pairs": axis_pairs(gens.shape[2]),
        "commutator": commutator_sizes(gens),
        "frequencies": frequencies(gens),
        "kernel_centre": kernel(gens, coords, centre),
        "kernel_corner": kernel(gens, coords, 0),
        "invariance_error": invariance_error(gens, coords, grid, centre, 0) if n > 1 else torch.zeros(gens.shape[:2]),
    }


def plot_model(info: dict[str, Any], title: str, path: Path) -> Path:
    """Kernel heat maps (centre and corner query, middle slice for 3D) per layer (head 0) and frequencies."""
    grid, depth = info["grid"], info["commutator"].shape[0]
    fig = Figure(figsize=(2.4 * depth + 3.5, 5), layout="constrained")
    axes = fig.subplots(2, depth + 1, squeeze=False)
    for layer in range(depth):
        for row, key in enumerate(("kernel_centre", "kernel_corner")):
            image = info[key][layer, 0].reshape(grid).numpy()
            image = image[image.shape[0] // 2] if image.ndim == 3 else image  # 3D: the middle frame
            im = axes[row, layer].imshow(image, cmap="RdBu_r", vmin=-1, vmax=1)
            axes[row, layer].set_title(f"layer {layer} {key.split('_')[1]} query", fontsize=8)
            axes[row, layer].set_xticks([]), axes[row, layer].set_yticks([])
    fig.colorbar(im, ax=axes[:, depth - 1], shrink=0.7, label="tr(R(p)^T R(p')) / d")
    freqs = info["frequencies"]
    for axis, ax in enumerate(axes[:, depth]):
        for layer in range(depth):
            ax.semilogy(freqs[layer, 0, axis].clamp_min(1e-4).numpy(), label=f"layer {layer}")
        ax.set_title(f"axis {axis} frequencies (head 0)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, depth].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    layout.write_figure(fig, path, dpi=110)
    return path


def plot_commutator_steps(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: Path) -> Path | None:
    """``commutator_mean`` (solid) and ``commutator_max`` (dotted) against step, one colour per run."""
    runs = [(name, [r for r in log if "commutator_mean" in r]) for name, log in runs]
    runs = [(name, log) for name, log in runs if log]
    if not runs:
        return None
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for name, log in runs:
        steps = [r["step"] for r in log]
        (line,) = ax.plot(steps, [r["commutator_mean"] for r in log], label=name)
        ax.plot(steps, [r["commutator_max"] for r in log], color=line.get_color(), linestyle=":")
    ax.set(xlabel="step", ylabel="|[A_x, A_y]| / (|A_x| |A_y|)", title="generator commutator (mean solid, max dotted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    layout.write_figure(fig, path, dpi=120)
    return path


def _runs(root: Path) -> list[tuple[str, Path]]:
    """``(name, checkpoint)`` pairs: every run of an A/B folder that left a checkpoint (a file, or a ``--fsdp`` run's
    DCP folder), or the folder's own run."""
    if (root / layout.RESULTS_JSON).is_file():
        runs = [(r.run_dir, run_checkpoint.find(root / r.run_dir)) for r in AbResults.load(root).runs]  # inside root
        return [(name, found) for name, found in runs if found is not None]  # diverged: none
    if (found := run_checkpoint.find(root)) is not None:
        return [(root.name, found)]
    raise layout.RunFolderError(
        f"run folder {root}: neither {layout.RESULTS_JSON} (train.ab) nor {layout.LAST} or {layout.LAST_DCP}/ found"
    )


def _fmt(values: Tensor) -> str:
    return f"{float(values.min()):.3g} / {float(values.median()):.3g} / {float(values.max()):.3g}"


def largest_factor_accuracies(folder: Path) -> dict[str, float]:
    """Per extrapolation kind in the run's ``evaluation.json``: ``"<kind> <factor>x"`` -> test accuracy at the
    largest factor with ``index`` coordinates (empty without evaluations)."""
    path = folder / layout.EVALUATION
    records = layout.read_json(path).get("extrapolate", []) if path.is_file() else []
    largest: dict[str, dict[str, Any]] = {}
    for record in (r for r in records if r["mode"] == "index"):
        if record["kind"] not in largest or record["factor"] > largest[record["kind"]]["factor"]:
            largest[record["kind"]] = record
    return {f"{kind} {r['factor']:g}x": r["accuracy"] for kind, r in largest.items()}


def correlation_table(per_run: Sequence[tuple[str, float, dict[str, float]]]) -> str | None:
    """Mean commutator against extrapolation accuracy, run by run, with Spearman's rho (permutation p) per
    extrapolation column over the runs that have it; None with fewer than 3 such runs."""
    columns = sorted({c for _, _, accuracies in per_run for c in accuracies})
    if not columns or len(per_run) < 3:
        return None
    rows = [
        f"| {name} | {comm:.3g} | " + " | ".join(f"{100 * acc[c]:.1f}" if c in acc else "—" for c in columns) + " |"
        for name, comm, acc in per_run
    ]
    found = []
    for column in columns:
        pairs = [(comm, acc[column]) for _, comm, acc in per_run if column in acc]
        if len(pairs) >= 3:
            rho, p = spearman(*zip(*pairs, strict=True))
            found.append(f"{column}: rho {rho:.2f} (p {p:.2g}, {len(pairs)} runs)")
    header = "| run | mean commutator | " + " | ".join(f"{c} (%, index)" for c in columns) + " |"
    return "\n".join(
        [
            "Mean commutator (over layers, heads and axis pairs) against extrapolation accuracy, per run. Spearman "
            "rank correlation across these runs: " + ("; ".join(found) or "too few runs") + ".",
            "",
            header,
            "|---|---:|" + "---:|" * len(columns),
            *rows,
        ]
    )


def section(root: str | Path) -> str | None:
    """Inspect every run under ``root`` (PNGs written there); the markdown section, or None if no run has
    generators."""
    root = Path(root)
    rows, figures, logs, per_run = [], [], [], []
    for name, saved in _runs(root):
        folder = saved.parent
        info = inspect_model(run_checkpoint.load_model(saved))
        if info is None:
            continue
        figures.append(plot_model(info, name, root / f"inspect_{name}.png").name)
        if info["pairs"]:
            per_run.append((name, float(info["commutator"].mean()), largest_factor_accuracies(folder)))
        if (folder / "metrics.jsonl").is_file():
            logs.append((name, layout.read_jsonl(folder / "metrics.jsonl")))
        pairs = ", ".join(f"axes {a}-{b}" for a, b in info["pairs"])
        for layer, head in np.ndindex(*info["commutator"].shape[:2]):
            comm = info["commutator"][layer, head]
            freqs = "; ".join(_fmt(f) for f in info["frequencies"][layer, head])
            rows.append(f"| {name} | {layer} | {head} | {', '.join(f'{c:.3g}' for c in comm.tolist()) or '—'} "
                        f"| {freqs} | {float(info['invariance_error'][layer, head]):.3g} |")  # fmt: skip
    if not rows:
        return None
    steps = plot_commutator_steps(logs, root / "commutator_steps.png")
    text = [
        "## Inside the learned encodings",
        "Per layer and head: commutator size `|[A_a, A_b]|_F / (|A_a|_F |A_b|_F)` per axis pair "
        f"({pairs}; 0 = commuting, RoPE-Mixed-like), rotation frequencies per axis (min / median / max of the "
        "generators' eigenvalues `|Im|`, radians per coordinate unit), and the translation-invariance error: the "
        "largest difference at equal offsets between the relative-position kernel `tr(R(p)^T R(p')) / d` (the "
        "exact mean of `<R(p) q, R(p') q>` over random isotropic `q`) of the centre query and of the corner query.",
        "| run | layer | head | commutator | frequencies per axis | invariance error |\n|---|---:|---:|---|---|---:|\n"
        + "\n".join(rows),
        *([table] if (table := correlation_table(per_run)) else []),
        *(f"![{f}]({f})" for f in figures),
    ]
    if steps is not None:
        text.append(f"![commutator over training]({steps.name})")
    return "\n\n".join(text)


def write(root: str | Path) -> Path | None:
    """Write ``inspect.md`` (and the PNGs) into ``root``; its path, or None when nothing has generators."""
    text = section(root)
    if text is None:
        return None
    path = Path(root) / OUTPUT
    layout.write_text(path, text + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> Path | None:
    from train import cli  # not at the top: train.cli imports train.loop

    p = argparse.ArgumentParser(prog="python -m train.ab.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a train.ab folder (results.json) or one run's folder (last.pt)")
    cli.add_common_options(p)
    path = write(p.parse_args(argv).run_dir)
    print(f"inspection: {path}" if path else "no run with learned generators (LieRE, RoPE-Mixed, STRING, ComRoPE)")
    return path


if __name__ == "__main__":
    from train import cli

    cli.run(main)
