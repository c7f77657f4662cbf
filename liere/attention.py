"""Attention with rotary encodings: rotate queries and keys (never values), then fused SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Proxy

from liere.fx import call_leaf
from liere.precision import apply_dtype
from liere.rotations import Rotations


def last_positions(rot: Rotations, n: int) -> Rotations:
    """The rotations of ``rot``'s last ``n`` positions (the queries of a decoding step)."""
    if n == rot.num_positions:
        return rot
    if rot.is_identity:
        return Rotations(rot.head_dim, shape=(rot.depth, *rot._lead[1:3], n))
    if rot.blocks is not None:
        return Rotations(rot.head_dim, blocks=rot.blocks[:, :, :, -n:])
    return Rotations(rot.head_dim, cos=rot.cos[:, :, :, -n:], sin=rot.sin[:, :, :, -n:], basis=rot.basis)


def repeat_heads(rot: Rotations, times: int) -> Rotations:
    """``rot`` with each head's rotations repeated ``times`` times (``repeat_interleave``): the rotations of one key/
    value head, given to each of the query heads of its group."""
    if times == 1 or rot._lead[2] == 1:
        return rot
    return rot._map(lambda t: t.repeat_interleave(times, dim=2))


def check_shapes(q: Tensor, k: Tensor, v: Tensor, rot: Rotations) -> None:
    """Raise unless q ``(b, Hq, nq, d)``, k ``(b, Hkv, nk, d)`` and v ``(b, Hkv, nk, dv)`` fit together and ``rot``
    (``Hkv`` dividing ``Hq``, ``nq <= nk``, one rotation per key position)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (batch, heads, n, head_dim), got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q, k, v do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(same batch and head_dim for q and k, same batch, heads and length for k and v)"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q's {q.shape[1]} heads must be a multiple of k's {k.shape[1]} (grouped key/value heads)")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q has {q.shape[2]} tokens but k only {k.shape[2]}: queries are the last key positions")
    if rot.num_positions != k.shape[2]:
        raise ValueError(f"rot holds {rot.num_positions} positions, k {k.shape[2]}: give one rotation per key")


def rotary_attention(q: Tensor, k: Tensor, v: Tensor, rot: Rotations, **sdpa_kwargs: object) -> Tensor:
    """``scaled_dot_product_attention(R q, R k, v)`` for q ``(batch, Hq, nq, head_dim)``, k and v
    ``(batch, Hkv, nk, head_dim)``.

    ``rot`` holds one layer's rotations (depth 1) for the ``nk`` key positions; queries sit at the last ``nq`` of them
    (``nq < nk``: decoding with a cache; for cross-attention rotate queries and keys yourself). Grouped key/value
    heads (GQA, MQA: ``Hkv`` dividing ``Hq``) as SDPA's ``enable_gqa``: with rotations per key/value head
    (``Hkv`` heads) query head ``h`` uses those of its group ``h // (Hq / Hkv)``; with rotations per query head the
    keys and values are repeated per query head first. ``sdpa_kwargs`` (``attn_mask``, ``is_causal``, ``dropout_p``,
    ``scale``) go to ``torch.nn.functional.scaled_dot_product_attention``; note that its ``is_causal`` aligns the
    causal mask top-left, so decoding steps (``nq < nk``) pass an ``attn_mask``. Output has q's shape (v's last dim).
    Without gradients (inference), shared block rotations rotate q and k in one pass over the matrices.
    """
    if isinstance(q, Proxy):  # torch.fx symbolic tracing: this call as one node
        return call_leaf(q.tracer, rotary_attention, q, k, v, rot.node(q.tracer), **sdpa_kwargs)
    check_shapes(q, k, v, rot)
    group = q.shape[1] // k.shape[1]
    if group > 1 and rot._lead[2] == q.shape[1]:  # rotations per query head: every query head needs its own keys
        k, v, group = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), 1
    if group > 1:
        sdpa_kwargs = {**sdpa_kwargs, "enable_gqa": True}
    if rot.kind != "blocks" or q.shape != k.shape:
        return F.scaled_dot_product_attention(
            repeat_heads(last_positions(rot, q.shape[2]), group).apply(q), rot.apply(k), v, **sdpa_kwargs
        )
    rot = rot.to(apply_dtype(q.dtype, rot.dtype, q.device.type, matmul=True))  # cast once for both matmuls
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or rot.blocks.requires_grad)
    if grad or rot.blocks.shape[1] != 1:  # training: rotate q and k apart (no concatenated copy kept for backward)
        return F.scaled_dot_product_attention(rot.apply(q), rot.apply(k), v, **sdpa_kwargs)
    q, k = rot.apply(torch.cat([q, k])).chunk(2)
    return F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)
