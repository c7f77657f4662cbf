"""Procedural 3D clips: one shape moving in a straight line over T frames, for (C, T, H, W) models.

Label = shape * 4 + motion, with 4 shapes (square, disk, cross, triangle) and 4 motions (right, left,
down, up): 16 classes. One frame tells the shape but not the motion, and playing a clip backwards
turns it into the same shape moving the opposite way (a different label), so a model must use both
appearance and temporal order. Shapes have random size (22-38% of the frame), start and speed (the
whole clip travels 18-45% of the frame) and stay inside the frame on every frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from train.data.cache import generated_splits
from train.data.source import Source
from train.data.splits import ImageSplits

SHAPES = ("square", "disk", "cross", "triangle")
MOTIONS = ("right", "left", "down", "up")
VELOCITY = np.array([(1, 0), (-1, 0), (0, 1), (0, -1)], dtype=np.float64)  # (dx, dy), y down
OPPOSITE = (1, 0, 3, 2)
NUM_CLASSES = len(SHAPES) * len(MOTIONS)
CHUNK_VOXELS = 2**24  # voxels rendered at once (bounds the float32 temporaries to 64 MB each)


# Indicator of each shape in its own frame: u, v in units of the shape's half-size, v pointing down.
_INSIDE = (
    lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    lambda u, v: u * u + v * v <= 0.81,
    lambda u, v: (np.minimum(np.abs(u), np.abs(v)) <= 0.3) & (np.maximum(np.abs(u), np.abs(v)) <= 0.9),
    lambda u, v: (v <= 0.8) & (np.abs(u) <= (v + 0.9) / 1.7 * 0.9),
)


def render(
    shape: np.ndarray, center: np.ndarray, velocity: np.ndarray, radius: np.ndarray, frames: int, size: int
) -> np.ndarray:
    """Clips (n, 1, frames, size, size) uint8 of shapes (n,) with pixel centres (n, 2) at frame 0,
    velocities (n, 2) in px/frame and half-sizes (n,) in px."""
    t = np.arange(frames)
    centers = (center[:, None, :] + t[None, :, None] * velocity[:, None, :]).astype(np.float32)  # (n, T, 2)
    pix = np.arange(size, dtype=np.float32) + 0.5
    r = radius[:, None, None, None].astype(np.float32)
    u = (pix[None, None, None, :] - centers[..., 0, None, None]) / r  # (n, T, 1, W)
    v = (pix[None, None, :, None] - centers[..., 1, None, None]) / r  # (n, T, H, 1)
    clips = np.zeros((len(shape), 1, frames, size, size), dtype=np.uint8)
    for k, inside in enumerate(_INSIDE):
        sel = shape == k
        clips[sel, 0] = inside(u[sel], v[sel]) * np.uint8(255)
    return clips


def sample(n: int, frames: int, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random clip parameters: shape, motion (n,) int64; center, velocity (n, 2); radius (n,)."""
    shape = rng.integers(0, len(SHAPES), n)
    motion = rng.integers(0, len(MOTIONS), n)
    radius = rng.uniform(0.11, 0.19, n) * size
    travel = VELOCITY[motion] * rng.uniform(0.18, 0.45, n)[:, None] * size
    lo = radius[:, None] + np.maximum(-travel, 0)  # keep the shape inside on every frame
    hi = size - radius[:, None] - np.maximum(travel, 0)
    velocity = travel / max(frames - 1, 1)
    center = lo + rng.random((n, 2)) * (hi - lo)
    return {"shape": shape, "motion": motion, "center": center, "velocity": velocity, "radius": radius}


def generate(n: int, frames: int = 8, size: int = 32, seed: int | tuple[int, ...] = 0) -> dict[str, np.ndarray]:
    """``n`` clips: images (n, 1, T, H, W) uint8, labels (n,) int64, plus the clip parameters."""
    params = sample(n, frames, size, np.random.default_rng(seed))
    keys = ("shape", "center", "velocity", "radius")
    chunk = max(1, CHUNK_VOXELS // (frames * size * size))
    chunks = [render(*(params[k][i : i + chunk] for k in keys), frames, size) for i in range(0, n, chunk)]
    clips = np.concatenate(chunks) if chunks else np.zeros((0, 1, frames, size, size), np.uint8)
    return {"images": clips, "labels": params["shape"] * len(MOTIONS) + params["motion"], **params}


def load(
    root: Path,
    seed: int,
    *,
    frames: int = 8,
    size: int = 32,
    num_train: int = 10000,
    num_val: int = 1000,
    num_test: int = 1000,
) -> ImageSplits:
    """Moving-shape clips: 1 x frames x size x size, 16 (shape, motion) classes (train/val/test seeded by split)."""
    sizes = (num_train, num_val, num_test)
    return generated_splits("clips3d", generate, NUM_CLASSES, root, seed, sizes, frames=frames, size=size)


def tubelets(options: dict[str, Any]) -> dict[str, Any]:
    """Model defaults: tubelets of 2 frames x 8 x 8 px (16 x 16 px for clips larger than 64 px)."""
    side = 8 if options.get("size", 32) <= 64 else 16
    return {"patch_size": (2, side, side)}


SOURCE = Source(
    "clips3d", "video", load, "one shape moving in a straight line: 16 (shape, motion) classes; generated",
    offline="generated", model_defaults=tubelets,
    preset_options={"smoke": dict(frames=4, size=16), "cpu": dict(frames=8, size=32), "gpu": dict(frames=16, size=64),
                    "paper": dict(frames=16, size=112)},
)  # fmt: skip
