"""Hugging Face transformers adapter: the model's own RoPE, or any 1D liere encoding, in a Llama-family decoder.

``liere_transformers(model, spec=None)`` adapts a decoder whose attention receives ``position_embeddings`` and
projects queries and keys with ``q_proj``/``k_proj`` (Llama, Qwen2, Mistral, ...): each layer's ``q_proj`` and
``k_proj`` are followed by the layer's rotations at the forward's ``position_ids``, and the model's rotary
embedding hands the attention an identity ``(cos, sin)`` (``cos = 1``, ``sin = 0``) carrying the rotations, so
transformers' own ``apply_rotary_pos_emb`` leaves q and k as rotated. Keys enter transformers' KV cache rotated, as
with its RoPE. See docs/transformers.md.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from liere.absolute import LearnedAbsolute, SinCosAbsolute
from liere.attention import repeat_heads
from liere.factory import available, build, encoding_info, parse_spec
from liere.integrations.forward_state import ForwardRotations, close_scope, current_scope, open_scope
from liere.rotations import Rotations
from liere.scaling import ROPE_TYPES, check_rope_parameters, scaled_frequencies

TESTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SEQ_LEN_TYPES = ("dynamic", "longrope")  # frequencies that depend on the forward's length


def rope_parameters_of(config: Any) -> dict:
    """The config's ``rope_parameters`` (one RoPE for all layers), checked to be reproducible here."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_type" not in params:
        raise ValueError(f"config.rope_parameters must be one dict with a rope_type, got {params!r}")
    if params["rope_type"] not in ROPE_TYPES:
        kind = params["rope_type"]
        raise ValueError(f"rope_parameters rope_type {kind!r} is not reproduced; supported: {', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"rope_parameters partial_rotary_factor must be 1.0, got {params['partial_rotary_factor']}")
    check_rope_parameters(params)
    return params


class ConfigRoPE(nn.Module):
    """A transformers config's RoPE computed by liere (``liere.scaled_frequencies``): pair ``j`` rotates by
    ``p * freqs[j]`` and q, k are multiplied by ``attention_factor``; the pairs are transformers' halves
    ``(j, j + head_dim / 2)`` (permuted in ``RotatedProjection``). ``dynamic`` and ``longrope`` frequencies
    follow the forward's length ``max(position_ids) + 1``, per forward (transformers keeps the largest length
    seen so far until a forward fits the original length again)."""

    def __init__(self, rope_parameters: dict, head_dim: int, max_position_embeddings: int) -> None:
        super().__init__()
        self.rope_parameters, self.head_dim = dict(rope_parameters), head_dim
        self.max_position_embeddings = max_position_embeddings
        freqs, self.attention_factor = self.frequencies(None)
        self.register_buffer("freqs", freqs, persistent=False)

    def frequencies(self, seq_len: int | None) -> tuple[Tensor, float]:
        """``(freqs (head_dim / 2,), attention_factor)`` for a forward over ``seq_len`` positions."""
        return scaled_frequencies(
            self.head_dim, self.rope_parameters, max_position_embeddings=self.max_position_embeddings, seq_len=seq_len
        )

    def forward(self, coords: Tensor) -> Rotations:
        """Rotations of positions ``coords`` ``(S, n, 1)``, depth 1, shared by heads."""
        freqs = self.freqs
        if self.rope_parameters["rope_type"] in SEQ_LEN_TYPES:
            freqs = self.frequencies(int(coords.max()) + 1)[0].to(coords.device)
        angles = coords.float() * freqs  # (S, n, pairs), fp32 as transformers computes them
        return Rotations.from_angles(angles[None, :, None], self.head_dim)


class ScopedPositions(tuple):
    """The identity ``(cos, sin)`` handed to the attention layers, carrying this forward's rotations (``scope``):
    the attention's pre-hook enters that scope, also when gradient checkpointing recomputes the layer later."""

    scope: ForwardRotations


class LiereRotaryEmbedding(nn.Module):
    """Stands in for the model's ``rotary_emb``: computes this forward's rotations (at ``position_ids``) and
    returns the identity ``(cos, sin)`` that carries them to the attention layers (``ScopedPositions``)."""

    def __init__(self, encoding: nn.Module, head_dim: int) -> None:
        super().__init__()
        self.encoding, self.head_dim = encoding, head_dim

    def forward(self, x: Tensor, position_ids: Tensor, **_: object) -> ScopedPositions:
        scope = ForwardRotations()
        scope.put(self.encoding(position_ids[..., None].to(torch.float32)))  # coords (S, n, 1)
        shape = (*position_ids.shape, self.head_dim)
        positions = ScopedPositions((x.new_ones(shape), x.new_zeros(shape)))
        positions.scope = scope
        return positions


def not_adapted(_: int) -> Rotations:
    raise RuntimeError("position_embeddings must come from the adapted model's rotary_emb (call the model)")


def _enter(_attn: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of each attention module: enter the rotations its ``position_embeddings`` carry."""
    positions = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
    open_scope(getattr(positions, "scope", None) or ForwardRotations(not_adapted))


def _leave(*_: object) -> None:
    """Forward hook (always called, also on errors): leave the attention's rotations scope."""
    close_scope()


class RotatedProjection(nn.Linear):
    """A layer's ``q_proj`` or ``k_proj`` (same weights, same state-dict keys) followed by its rotations.

    ``heads`` heads of ``head_dim`` features; rotations per key/value head are shared by the ``heads // kv_heads``
    query heads of each group. ``halves``: rotate transformers' pairs ``(j, j + head_dim / 2)`` (its own RoPE).
    """

    def __init__(self, linear: nn.Linear, heads: int, kv_heads: int, layer: int, halves: bool, factor: float) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.heads, self.group, self.layer, self.factor = heads, heads // kv_heads, layer, factor
        head_dim = linear.out_features // heads
        half = torch.arange(head_dim // 2)
        perm = torch.stack([half, half + head_dim // 2], dim=-1).flatten() if halves else torch.arange(head_dim)
        self.register_buffer("perm", perm, persistent=False)  # halves -> interleaved pairs
        self.register_buffer("unperm", perm.argsort(), persistent=False)
        self.halves = halves

    def forward(self, x: Tensor) -> Tensor:
        """``(b, n, heads * head_dim)`` projections rotated per head at this forward's positions."""
        out = super().forward(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (b, heads, n, head_dim)
        rot = repeat_heads(current_scope().get(x.shape[1]).for_layer(self.layer), self.group)
        out = rot.apply(out[..., self.perm])[..., self.unperm] if self.halves else rot.apply(out)
        if self.factor != 1.0:
            out = out * self.factor
        return out.transpose(1, 2).flatten(-2)


def decoder_parts(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """The base model (holding ``rotary_emb``) and its attention modules; raises for other architectures."""
    base = getattr(model, "base_model", model)
    attns = [layer.self_attn for layer in getattr(base, "layers", []) if hasattr(layer, "self_attn")]
    ok = isinstance(getattr(base, "rotary_emb", None), nn.Module) and attns
    ok = ok and all(
        isinstance(getattr(a, "q_proj", None), nn.Linear)
        and isinstance(getattr(a, "k_proj", None), nn.Linear)
        and "position_embeddings" in inspect.signature(a.forward).parameters
        and getattr(a, "q_norm", None) is None
        and getattr(a, "k_norm", None) is None
        for a in attns
    )
    if not ok:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"liere_transformers: {type(model).__name__} (model_type {model_type!r}) is not supported: it needs a "
            f"decoder whose attention receives position_embeddings and projects q_proj/k_proj without q/k norm "
            f"(tested: {', '.join(TESTED_MODEL_TYPES)})"
        )
    return base, attns


def build_encoding(spec: str | None, config: Any, head_dim: int, kv_heads: int, depth: int, **options: object):
    """The encoding for ``spec`` (None: the config's own RoPE), validated before the model is touched."""
    if spec is None:
        if options:
            raise ValueError(f"options {sorted(options)} need a spec (spec=None reproduces the model's RoPE)")
        return ConfigRoPE(rope_parameters_of(config), head_dim, config.max_position_embeddings)
    name = parse_spec(spec)[0]
    axes = next((info.axes for info in map(encoding_info, available()) if info.pattern.fullmatch(name)), (1,))
    if 1 not in axes:
        raise ValueError(f"spec {spec!r} encodes {' or '.join(map(str, axes))}D positions; a decoder needs a 1D one")
    additive = dict(dim=config.hidden_size, grid_shape=(config.max_position_embeddings,))  # built, then refused
    pe = build(spec, head_dim=head_dim, num_axes=1, num_heads=kv_heads, depth=depth, **additive, **options)
    if pe.num_axes != 1:
        raise ValueError(f"spec {spec!r} is a {pe.num_axes}D encoding; a decoder needs a 1D one")
    if isinstance(pe, (LearnedAbsolute, SinCosAbsolute)):
        raise ValueError(f"spec {spec!r} is additive (added to the embeddings); the adapter takes rotary encodings")
    return pe


def liere_transformers(model: nn.Module, spec: str | None = None, **options: object) -> nn.Module:
    """Adapt ``model`` (a transformers decoder, with or without LM head) in place; returns the encoding.

    ``spec=None``: the model's own RoPE from ``config.rope_parameters``, computed by liere (same logits).
    Otherwise the 1D encoding ``liere.build(spec, **options)``, with one parameter set per layer and key/value head
    (query heads of a group share their key/value head's rotations). The spec is recorded in ``config.liere`` so
    that ``save_pretrained`` then ``from_pretrained`` restores the adapted model.
    """
    base, attns = decoder_parts(model)
    if isinstance(base.rotary_emb, LiereRotaryEmbedding):
        raise ValueError("model is already adapted by liere_transformers (adapt a fresh model)")
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = attns[0].head_dim
    pe = build_encoding(spec, config, head_dim, kv_heads, len(attns), **options)
    factor = float(getattr(pe, "attention_factor", 1.0))
    base.rotary_emb = LiereRotaryEmbedding(pe, head_dim)
    for layer, attn in enumerate(attns):
        attn.q_proj = RotatedProjection(attn.q_proj, heads, kv_heads, layer, spec is None, factor)
        attn.k_proj = RotatedProjection(attn.k_proj, kv_heads, kv_heads, layer, spec is None, factor)
        attn.register_forward_pre_hook(_enter, with_kwargs=True)
        attn.register_forward_hook(_leave, always_call=True)
    config.liere = {"spec": spec, "options": options}
    return pe


def encoding_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the adapter's encoding (under ``rotary_emb.encoding``)."""
    return [key for key in model.state_dict() if ".rotary_emb.encoding." in f".{key}"]


def from_pretrained(path: str | Path, **kwargs: object) -> nn.Module:
    """Load a causal LM saved with ``save_pretrained`` after ``liere_transformers``, with its trained encoding.

    ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``).
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    config = AutoConfig.from_pretrained(path)
    recorded = getattr(config, "liere", None)
    if not isinstance(recorded, dict) or "spec" not in recorded:
        raise ValueError(f"{path}: config.json has no liere entry (save a model adapted by liere_transformers)")
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the encoding's keys are unknown to the plain model: loaded below
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    finally:
        logging.set_verbosity(verbosity)
    liere_transformers(model, recorded["spec"], **recorded.get("options", {}))
    keys, state = encoding_keys(model), {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            stored = set(f.keys())  # noqa: SIM118 (a safetensors file, not a dict)
            state |= {key: f.get_tensor(key) for key in keys if key in stored}
    missing = sorted(set(keys) - set(state))
    if missing:
        raise ValueError(f"{path}: the saved weights lack the encoding's {missing}")
    model.load_state_dict(state, strict=False)
    return model


__all__ = ["from_pretrained", "liere_transformers"]
