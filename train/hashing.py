"""SHA-256 checksums of nested state (dicts, lists, tuples, tensors by their exact bytes, numbers, strings):
the integrity check shared by checkpoints (``train.checkpoint``) and the data cache (``train.data.cache``)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def _digest(value: Any, sha: Any) -> None:
    """Feed a value (nested dicts, lists, tuples, tensors, numbers, strings) into ``sha``."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        sha.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        sha.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            sha.update(repr(key).encode())
            _digest(value[key], sha)
    elif isinstance(value, (list, tuple)):
        sha.update(f"L{len(value)}".encode())
        for item in value:
            _digest(item, sha)
    else:
        sha.update(repr(value).encode())


def checksum(state: dict[str, Any]) -> str:
    """SHA-256 over every entry of ``state`` except ``checksum`` itself (tensors by their exact bytes)."""
    sha = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "checksum"}, sha)
    return sha.hexdigest()
