"""Attention with rotary encodings: rotate queries and keys (never values), then fused SDPA."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.fx import Proxy

from liere.fx import call_leaf, rotations_node
from liere.precision import apply_dtype
from liere.rotations import Rotations


def rotary_attention(q: Tensor, k: Tensor, v: Tensor, rot: Rotations, **sdpa_kwargs: object) -> Tensor:
    """``scaled_dot_product_attention(R q, R k, v)`` for q, k, v of shape ``(batch, heads, n, head_dim)``.

    ``rot`` holds one layer's rotations (depth 1); ``sdpa_kwargs`` (``attn_mask``, ``is_causal``,
    ``dropout_p``, ``scale``) go to ``torch.nn.functional.scaled_dot_product_attention``. Output has v's shape.
    """
    if isinstance(q, Proxy):  # torch.fx symbolic tracing: this call as one node
        return call_leaf(q.tracer, rotary_attention, q, k, v, rotations_node(rot, q.tracer), **sdpa_kwargs)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if rot.kind == "blocks":  # cast the block matrices once for both matmuls (not twice: two saved copies)
        rot = rot.to(apply_dtype(q.dtype, rot.dtype, q.device.type, matmul=True))
    return F.scaled_dot_product_attention(rot.apply(q), rot.apply(k), v, **sdpa_kwargs)
