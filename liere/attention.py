"""Attention with rotary encodings: rotate queries and keys (never values), then fused SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Proxy

from liere.fx import call_leaf
from liere.precision import apply_dtype
from liere.rotations import Rotations


def rotary_attention(q: Tensor, k: Tensor, v: Tensor, rot: Rotations, **sdpa_kwargs: object) -> Tensor:
    """``scaled_dot_product_attention(R q, R k, v)`` for q, k, v of shape ``(batch, heads, n, head_dim)``.

    ``rot`` holds one layer's rotations (depth 1); ``sdpa_kwargs`` (``attn_mask``, ``is_causal``,
    ``dropout_p``, ``scale``) go to ``torch.nn.functional.scaled_dot_product_attention``. Output has v's shape.
    Without gradients (inference), shared block rotations rotate q and k in one pass over the matrices: the
    rotations are read once per forward instead of twice.
    """
    if isinstance(q, Proxy):  # torch.fx symbolic tracing: this call as one node
        return call_leaf(q.tracer, rotary_attention, q, k, v, rot.node(q.tracer), **sdpa_kwargs)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if rot.kind != "blocks":
        return F.scaled_dot_product_attention(rot.apply(q), rot.apply(k), v, **sdpa_kwargs)
    rot = rot.to(apply_dtype(q.dtype, rot.dtype, q.device.type, matmul=True))  # cast once for both matmuls
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or rot.blocks.requires_grad)
    if grad or rot.blocks.shape[1] != 1:  # training: rotate q and k apart (no concatenated copy kept for backward)
        return F.scaled_dot_product_attention(rot.apply(q), rot.apply(k), v, **sdpa_kwargs)
    q, k = rot.apply(torch.cat([q, k])).chunk(2)
    return F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)
