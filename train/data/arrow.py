"""The LieRE paper's synthetic spatial-reasoning task ("arrow task", section 5.2), generated in numpy.

An ``image_size`` px grayscale image is cut into ``grid`` x ``grid`` cells of ``image_size // grid`` px
(any remainder is blank margin at the bottom/right). Eight arrows and six letters (A, B, C, D, E, Y)
sit in distinct random cells; exactly one arrow sits in the cell directly below the "Y" (at its base),
and the label is that arrow's direction, one of 8 (N, NE, E, SE, S, SW, W, NW; chance = 12.5%). The
seven other arrows are distractors with uniform random directions, so the answer is only readable by
relating the Y's position to the arrows'. Labels are uniform over the 8 directions.

Glyphs are rasterised once per cell size (4x supersampled, box-filtered: anti-aliased at 12 px and
legible down to 8 px) and pasted with one fancy-indexing op, so 10k images take well under a second.
Layout is kept as ``cells``: (N, grid, grid) int codes, 0 empty, 1..8 arrow of direction code-1,
9..14 letters A, B, C, D, E, Y.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from train.data.cache import generated, generated_splits
from train.data.source import Extrapolation, Source
from train.data.splits import ImageSplits, TensorImageDataset

DIRECTIONS = ("N", "NE", "E", "SE", "S", "SW", "W", "NW")
LETTERS = "ABCDEY"
ARROW0, LETTER0 = 1, 1 + len(DIRECTIONS)  # cell codes; 0 is an empty cell
Y_CODE = LETTER0 + LETTERS.index("Y")
NUM_ARROWS = 8
SUPERSAMPLE = 4
_STROKE = 0.11  # stroke half-width, in units of half a cell


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 12) -> list:
    t = np.radians(np.linspace(a0, a1, n))
    return list(zip(cx + rx * np.cos(t), cy - ry * np.sin(t), strict=True))


# Letter strokes as polylines in a [-1, 1]^2 cell frame, x right, y down.
_LETTER_STROKES = {
    "A": [[(-0.55, 0.75), (0, -0.75), (0.55, 0.75)], [(-0.33, 0.2), (0.33, 0.2)]],
    "B": [
        [(-0.45, -0.75), (-0.45, 0.75)],
        _arc(-0.45, -0.375, 0.75, 0.375, 90, -90),
        _arc(-0.45, 0.375, 0.85, 0.375, 90, -90),
    ],
    "C": [_arc(0.05, 0, 0.55, 0.75, 50, 310, 20)],
    "D": [[(-0.45, -0.75), (-0.45, 0.75)], _arc(-0.45, 0, 0.9, 0.75, 90, -90, 20)],
    "E": [[(0.45, -0.75), (-0.45, -0.75), (-0.45, 0.75), (0.45, 0.75)], [(-0.45, 0), (0.3, 0)]],
    "Y": [[(-0.55, -0.75), (0, 0), (0.55, -0.75)], [(0, 0), (0, 0.75)]],
}


def _frame(cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-centre coordinates of one cell in the [-1, 1]^2 frame, each (S, S)."""
    n = cell * SUPERSAMPLE
    t = (np.arange(n) + 0.5) / n * 2 - 1
    y, x = np.meshgrid(t, t, indexing="ij")
    return x, y


def _downsample(mask: np.ndarray, cell: int) -> np.ndarray:
    """(S, S) bool supersampled mask -> (cell, cell) coverage in [0, 1] (box filter)."""
    return mask.reshape(cell, SUPERSAMPLE, cell, SUPERSAMPLE).mean(axis=(1, 3))


def _strokes(polylines: list, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mask of points within ``_STROKE`` of any segment of the polylines."""
    dist = np.full(x.shape, np.inf)
    for line in polylines:
        for (ax, ay), (bx, by) in zip(line[:-1], line[1:], strict=True):
            dx, dy = bx - ax, by - ay
            t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0, 1)
            dist = np.minimum(dist, np.hypot(x - ax - t * dx, y - ay - t * dy))
    return dist <= _STROKE


def _arrow(direction: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mask of an arrow (shaft + filled triangular head) pointing to DIRECTIONS[direction]."""
    angle = np.radians(90 - 45 * direction)  # compass -> math angle; the frame's y points down
    u = x * np.cos(angle) - y * np.sin(angle)  # along the arrow
    v = x * np.sin(angle) + y * np.cos(angle)  # across it
    shaft = (u >= -0.8) & (u <= 0.2) & (np.abs(v) <= _STROKE)
    head = (u >= 0.1) & (u <= 0.8) & (np.abs(v) <= 0.45 * (0.8 - u) / 0.7)
    return shaft | head


def glyph_bank(cell: int) -> np.ndarray:
    """(15, cell, cell) uint8 glyphs indexed by cell code (0 = empty)."""
    x, y = _frame(cell)
    masks = [np.zeros_like(x, dtype=bool)]
    masks += [_arrow(d, x, y) for d in range(len(DIRECTIONS))]
    masks += [_strokes(_LETTER_STROKES[c], x, y) for c in LETTERS]
    return np.stack([np.round(_downsample(m, cell) * 255).astype(np.uint8) for m in masks])


def sample_layouts(n: int, grid: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random layouts: ``cells`` (n, grid, grid) int8 codes and ``labels`` (n,) int64 directions."""
    num_cells = grid * grid
    others = NUM_ARROWS - 1 + len(LETTERS) - 1
    if grid < 2 or num_cells < others + 2:
        raise ValueError(f"grid {grid} too small for {NUM_ARROWS} arrows and {len(LETTERS)} letters")
    rows = np.arange(n)
    y_cell = rng.integers(0, num_cells - grid, n)  # any row but the last
    labels = rng.integers(0, len(DIRECTIONS), n)
    keys = rng.random((n, num_cells))
    keys[rows, y_cell] = keys[rows, y_cell + grid] = 2.0  # exclude the Y and its target cell
    spots = np.argsort(keys, axis=1)[:, :others]
    codes = np.concatenate(
        [
            ARROW0 + rng.integers(0, len(DIRECTIONS), (n, NUM_ARROWS - 1)),
            np.broadcast_to(np.arange(LETTER0, Y_CODE), (n, len(LETTERS) - 1)),
        ],
        axis=1,
    )
    cells = np.zeros((n, num_cells), dtype=np.int8)
    cells[rows[:, None], spots] = codes
    cells[rows, y_cell] = Y_CODE
    cells[rows, y_cell + grid] = ARROW0 + labels
    return cells.reshape(n, grid, grid), labels


def render(cells: np.ndarray, image_size: int) -> np.ndarray:
    """Layouts (n, grid, grid) -> images (n, 1, image_size, image_size) uint8."""
    n, grid, _ = cells.shape
    cell = image_size // grid
    if cell < 4:
        raise ValueError(f"cells of {cell} px (image_size={image_size}, grid={grid}) are too small")
    tiles = glyph_bank(cell)[cells]  # (n, grid, grid, cell, cell)
    images = np.zeros((n, 1, image_size, image_size), dtype=np.uint8)
    images[:, 0, : grid * cell, : grid * cell] = tiles.transpose(0, 1, 3, 2, 4).reshape(n, grid * cell, grid * cell)
    return images


def label_from_cells(cells: np.ndarray) -> np.ndarray:
    """Direction of the arrow under each layout's Y, recomputed from ``cells`` (n, grid, grid)."""
    n, grid, _ = cells.shape
    y_cell = np.argmax(cells.reshape(n, -1) == Y_CODE, axis=1)
    below = cells.reshape(n, -1)[np.arange(n), y_cell + grid]
    return below.astype(np.int64) - ARROW0


def generate(n: int, image_size: int = 108, grid: int = 9, seed: int | tuple[int, ...] = 0) -> dict[str, np.ndarray]:
    """``n`` arrow-task samples: images (n, 1, S, S) uint8, labels (n,) int64, cells (n, g, g) int8."""
    cells, labels = sample_layouts(n, grid, np.random.default_rng(seed))
    return {"images": render(cells, image_size), "labels": labels, "cells": cells}


def load(
    root: Path,
    seed: int,
    *,
    image_size: int = 108,
    grid: int = 9,
    num_train: int = 20000,
    num_val: int = 2000,
    num_test: int = 2000,
) -> ImageSplits:
    """The arrow task: 1 x image_size x image_size, 8 direction classes (train/val/test seeded by split)."""
    sizes = (num_train, num_val, num_test)
    return generated_splits("arrow", generate, len(DIRECTIONS), root, seed, sizes, image_size=image_size, grid=grid)


def canvas(image_size: int, grid: int) -> Extrapolation:
    """Test sets on a canvas of ``round(grid * factor)`` cells of the trained cell size (``image_size`` and
    ``grid`` are the defaults the data options override)."""

    def test_set(root: Path, seed: int, options: dict[str, Any], factor: float) -> tuple[Dataset, dict[str, Any]]:
        old_grid = options.get("grid", grid)
        cell, new_grid = options.get("image_size", image_size) // old_grid, max(1, round(old_grid * factor))
        size, counts = cell * new_grid, {"test": options.get("num_test", 2000)}
        data, _ = generated("arrow", generate, root, seed, counts, image_size=size, grid=new_grid)
        info = {"size": [size] * 2, "grid": [new_grid] * 2, "rounded": not math.isclose(new_grid, old_grid * factor),
                "label": f"canvas {size} px, grid {new_grid}x{new_grid}"}  # fmt: skip
        return TensorImageDataset.from_dict(data["test"]), info

    return Extrapolation("canvas", "larger arrow canvas, same cell size", test_set)


def one_patch_per_cell(image_size: int, grid: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Model defaults: square patches of one cell (``image_size // grid`` px)."""
    return lambda options: {"patch_size": options.get("image_size", image_size) // options.get("grid", grid)}


SOURCE = Source(
    "arrow", "image", load,
    "the LieRE paper's spatial-reasoning task; generated: 48 px, 6x6 cells (cpu preset), 108 px, 9x9 (gpu, paper)",
    offline="generated", model_defaults=one_patch_per_cell(108, 9), extrapolation=canvas(108, 9),
    preset_options={
        "smoke": dict(image_size=32, grid=4, num_train=256, num_val=128, num_test=128),
        "cpu": dict(image_size=48, grid=6, num_train=8000, num_val=500, num_test=1000),
        "gpu": dict(image_size=108, grid=9, num_train=50000, num_val=2000, num_test=5000),
        "paper": dict(image_size=108, grid=9, num_train=100000, num_val=5000, num_test=10000),
    },
)  # fmt: skip
