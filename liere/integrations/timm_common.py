"""What the timm adapters share: per-call rotation scopes, timm's coordinate augmentations, patch-dropout gathers."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from liere import Rotations
from liere.integrations.forward_state import rotation_scope


def augment_coords(coords: Tensor, shift: float | None, jitter: float | None, rescale: float | None) -> Tensor:
    """timm's train-time RoPE coordinate augmentation (same order and draws as ``eva.py``'s ``rope_*_coords``).

    ``shift``: add one uniform ``[-shift, shift]`` offset per axis; ``jitter``: multiply each axis by its own
    log-uniform factor in ``[1/jitter, jitter]``; ``rescale``: multiply all axes by one such factor.
    """
    axes, like = coords.shape[-1], dict(device=coords.device, dtype=coords.dtype)
    if shift is not None:
        coords = coords + torch.empty(axes, **like).uniform_(-shift, shift)
    if jitter is not None:
        coords = coords * torch.empty(axes, **like).uniform_(-math.log(jitter), math.log(jitter)).exp()
    if rescale is not None:
        coords = coords * torch.empty(1, **like).uniform_(-math.log(rescale), math.log(rescale)).exp()
    return coords


def gather_positions(rot: Rotations, keep: Tensor, num_prefix_tokens: int) -> Rotations:
    """Per-sample rotations of the prefix tokens and the kept patch tokens ``keep`` ``(B, k)`` (patch indices)."""
    batch = keep.shape[0]
    prefix = torch.arange(num_prefix_tokens, device=keep.device).expand(batch, -1)
    index = torch.cat([prefix, keep + num_prefix_tokens], dim=1)  # (B, prefix + k)
    if rot.is_identity:
        return Rotations.identity(rot.head_dim, index.shape[1], rot.depth)

    def take(t: Tensor) -> Tensor:  # (depth, S, H, n, ...) -> (depth, B, H, prefix + k, ...)
        t = t.expand(t.shape[0], batch, *t.shape[2:])
        trailing = t.shape[4:]
        idx = index.view(1, batch, 1, -1, *[1] * len(trailing))
        return t.gather(3, idx.expand(t.shape[0], batch, t.shape[2], index.shape[1], *trailing))

    if rot.blocks is not None:
        return Rotations(rot.head_dim, blocks=take(rot.blocks))
    return Rotations(rot.head_dim, cos=take(rot.cos), sin=take(rot.sin), basis=rot.basis)


class RotaryScopeMixin:
    """A timm model whose forwards compute the rotations once per call in a scope (``liere_encoding``), whose blocks
    checkpoint themselves, and whose encoding parameters get no weight decay."""

    liere_encoding: nn.Module

    def forward_features(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        with rotation_scope():
            return super().forward_features(x, *args, **kwargs)

    def forward_intermediates(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        with rotation_scope():
            return super().forward_intermediates(x, *args, **kwargs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block (each block checkpoints itself; timm's own flag stays off)."""
        super().set_grad_checkpointing(False)
        for block in self.blocks:
            block.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """timm's no-decay names plus the encoding's parameters."""
        return super().no_weight_decay() | {f"liere_encoding.{n}" for n in self.liere_encoding.no_weight_decay()}
