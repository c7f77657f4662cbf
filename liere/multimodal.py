"""Positions of mixed text-image-video token sequences, as Qwen2-VL's ``get_rope_index`` assigns them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

KINDS = ("text", "image", "video")


def check_segment(index: int, segment: object, spatial_merge_size: int) -> tuple[str, tuple[int, ...]]:
    """``(kind, sizes)`` of one segment, or a one-line error naming it."""
    if not (isinstance(segment, (tuple, list)) and len(segment) == 2 and segment[0] in KINDS):
        raise ValueError(
            f"segments[{index}] must be ('text', n), ('image', (t, h, w)) or ('video', (t, h, w)), got {segment!r}"
        )
    kind, size = segment
    sizes = (size,) if kind == "text" else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(sizes) != (1 if kind == "text" else 3) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
    ):
        want = "a positive int n" if kind == "text" else "(t, h, w) of positive ints"
        raise ValueError(f"segments[{index}] ({kind}) needs {want}, got {size!r}")
    if kind != "text" and (sizes[1] % spatial_merge_size or sizes[2] % spatial_merge_size):
        raise ValueError(
            f"segments[{index}] ({kind}): h={sizes[1]} and w={sizes[2]} must be divisible by "
            f"spatial_merge_size={spatial_merge_size}"
        )
    return kind, sizes


def multimodal_positions(segments: Sequence[tuple[str, object]], spatial_merge_size: int = 1) -> Tensor:
    """Integer ``(t, h, w)`` positions ``(n, 3)`` of a sequence of text, image and video segments (Qwen2-VL M-RoPE).

    ``segments``: ``("text", n)`` for ``n`` text tokens, ``("image", (t, h, w))`` or ``("video", (t, h, w))`` for a
    patch grid (as ``grid_thw``) whose ``h x w`` patches are merged ``spatial_merge_size`` squared into one token:
    ``t * (h / m) * (w / m)`` tokens, row-major over ``(t, h, w)``. Text tokens sit on the diagonal ``(p, p, p)``
    and advance ``p`` by one each; a grid starting at ``p`` puts token ``(i, j, k)`` at ``(p + i, p + j, p + k)``
    and advances ``p`` by ``max(h, w) / m``. Use them as the coordinates of any 3-axis encoding
    (``pe(positions[None].float())``).
    """
    if not isinstance(spatial_merge_size, int) or isinstance(spatial_merge_size, bool) or spatial_merge_size < 1:
        raise ValueError(f"spatial_merge_size must be a positive int, got {spatial_merge_size!r}")
    if not isinstance(segments, (list, tuple)) or not segments:
        raise ValueError(f"segments must be a non-empty list of (kind, size), got {segments!r}")
    parts, start = [], 0
    for index, segment in enumerate(segments):
        kind, sizes = check_segment(index, segment, spatial_merge_size)
        if kind == "text":
            parts.append((torch.arange(sizes[0]) + start)[:, None].expand(-1, 3))
            start += sizes[0]
            continue
        t, h, w = sizes[0], sizes[1] // spatial_merge_size, sizes[2] // spatial_merge_size
        grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        parts.append(torch.stack(grid, dim=-1).reshape(-1, 3) + start)
        start += max(h, w)
    return torch.cat(parts)
