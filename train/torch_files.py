"""Reading ``torch.save`` files from a run folder or cache with memory bounded by the file's size.

``torch.load(weights_only=True)`` runs no code, but a small file can still describe a huge tensor: a stride-0 view
of 2^33 elements over one stored value takes a few bytes on disk and 8 GiB once anything copies it. Every tensor a
file holds must span no more bytes than its storage, which is in the file.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from train.run_dir import write_bytes_atomic


class OversizedTensor(ValueError):
    """A tensor in a file spans more bytes than its storage holds (an expanded view crafted to exhaust memory)."""


def tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested dicts, lists and tuples (iteratively: any nesting depth)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def check_sizes(value: Any, path: Path) -> None:
    """``OversizedTensor`` naming ``path`` when a tensor in ``value`` is not plain stored data: a sparse or other
    non-strided layout, or a view spanning more bytes than its storage holds (an expanded, stride-0 view)."""
    for tensor in tensors(value):
        if tensor.layout != torch.strided:
            raise OversizedTensor(f"{path} holds a tensor with layout {tensor.layout}: not a tensor this program wrote")
        size, stored = tensor.numel() * tensor.element_size(), tensor.untyped_storage().nbytes()
        if size > stored:
            raise OversizedTensor(
                f"{path} holds a tensor of shape {tuple(tensor.shape)} ({size} bytes) over {stored} stored bytes: "
                "an expanded view, not a tensor this program wrote"
            )


def load(path: str | Path, map_location: str | torch.device | None = None) -> Any:
    """``torch.load(path, weights_only=True)``, refusing tensors larger than their storage (``OversizedTensor``)."""
    value = torch.load(path, map_location=map_location, weights_only=True)
    check_sizes(value, Path(path))
    return value


def save(value: Any, path: str | Path) -> Path:
    """``torch.save(value)`` written atomically (a symlink at ``path`` is replaced, never written through)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return write_bytes_atomic(path, buffer.getvalue())
