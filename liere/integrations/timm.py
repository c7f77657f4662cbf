"""Put any ``liere`` encoding into a timm ``VisionTransformer``.

``liere_timm_vit(model, "liere8")`` keeps timm's model and weights layout and changes three things:

- timm's learned ``pos_embed`` is removed (``model.pos_embed = None``); the encoding is attached as
  ``model.liere_encoding``. Only the spec ``"abs"`` keeps timm's own ``pos_embed`` and returns the model as is.
- a forward hook on ``model.patch_embed`` reads the patch grid off the input, adds the encoding's absolute
  embedding if it has one (``"sincos"``), and computes the rotations ONCE per forward with the CLS/register
  tokens as unrotated prefix tokens (``pe(coords, num_prefix_tokens=model.num_prefix_tokens)``);
- every block's ``Attention`` is replaced by ``RotaryTimmAttention``, which reuses its submodules (so the
  state-dict keys are unchanged) and runs ``rotary_attention`` with its layer's rotations.

Coordinates are patch indices (``Grid((gh, gw))``), so ``dynamic_img_size=True`` models see larger
grids at larger coordinates. timm's ``no_weight_decay()`` does not list the encoding: add
``{"liere_encoding." + n for n in model.liere_encoding.no_weight_decay()}`` to the no-decay set.
"""

from __future__ import annotations

import timm
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from liere import Grid, PositionEncoding, Rotations, rotary_attention
from liere.factory import build, parse_spec


class RotationsForward:
    """Per-forward state shared by the hooks and the attention layers of one adapted model."""

    def __init__(self, encoding: PositionEncoding, num_prefix_tokens: int) -> None:
        self.encoding, self.num_prefix_tokens = encoding, num_prefix_tokens
        self.rot: Rotations | None = None

    def after_patch_embed(self, patch_embed: nn.Module, args: tuple[Tensor, ...], tokens: Tensor) -> Tensor:
        """Forward hook of ``patch_embed``: add any absolute embedding and compute this forward's rotations.

        ``tokens`` are ``(B, n, dim)`` (grid from ``patch_embed``) or ``(B, gh, gw, dim)`` (dynamic image size).
        """
        if tokens.dim() == 4:
            grid = tuple(tokens.shape[1:3])
        else:
            grid = tuple(patch_embed.dynamic_feat_size(tuple(args[0].shape[-2:])))
        flat = self.encoding.add_to_tokens(tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]), Grid(grid))
        self.rot = self.encoding(Grid(grid), num_prefix_tokens=self.num_prefix_tokens)
        return flat.reshape(tokens.shape)

    def release(self, *_: object) -> None:
        """Forward hook of the model: drop the rotations (and their graph) once the forward is done."""
        self.rot = None

    def for_layer(self, layer: int) -> Rotations:
        if self.rot is None:
            raise RuntimeError("rotations not computed: run the adapted model (its patch_embed) before its attention")
        return self.rot.for_layer(layer)


class RotaryTimmAttention(nn.Module):
    """timm ``Attention`` whose q and k are rotated by its layer's rotations; same submodules and keys."""

    def __init__(self, attn: Attention, rotations: RotationsForward, layer: int) -> None:
        super().__init__()
        for name, child in attn.named_children():
            self.add_module(name, child)
        if "gate" not in self._modules:
            self.gate = None
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        self.rotations, self.layer = rotations, layer

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """timm's ``Attention.forward`` (fused path) with ``rotary_attention``; ``x``: ``(B, n, dim)``."""
        batch, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        rot = self.rotations.for_layer(self.layer)
        x = rotary_attention(q, k, v, rot, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
        x = self.norm(x.transpose(1, 2).reshape(batch, n, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def liere_timm_vit(
    model: str | VisionTransformer,
    encoding: str = "liere8",
    *,
    create_kwargs: dict[str, object] | None = None,
    **encoding_options: object,
) -> VisionTransformer:
    """Give a timm ViT the position encoding ``encoding`` (a ``liere.build`` spec); modifies ``model`` in place.

    ``model`` is a ``VisionTransformer`` or a timm model name, created with
    ``timm.create_model(name, pretrained=False, **create_kwargs)``. The encoding is built with
    ``head_dim``/``num_heads`` of the attention layers, ``depth`` = number of blocks, ``dim`` = embed dim,
    ``grid_shape`` = the patch grid, and ``encoding_options``. Returns the model.
    """
    if isinstance(model, str):
        model = timm.create_model(model, pretrained=False, **(create_kwargs or {}))
    elif create_kwargs:
        raise ValueError("create_kwargs only apply when model is a timm model name")
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer or its name, got {type(model).__name__}")
    if parse_spec(encoding)[0] == "abs":
        return model  # timm's own learned absolute embedding
    if not isinstance(model.patch_drop, nn.Identity):
        raise ValueError("patch dropout (patch_drop_rate > 0) drops tokens after the rotations are fixed; disable it")
    attns = [block.attn for block in model.blocks]
    if any(type(attn) is not Attention for attn in attns):
        kinds = sorted({type(attn).__name__ for attn in attns})
        raise TypeError(f"only blocks with timm's plain Attention can be adapted, got {kinds}")
    pe = build(
        encoding,
        head_dim=attns[0].head_dim,
        num_axes=2,
        num_heads=attns[0].num_heads,
        depth=len(attns),
        dim=model.embed_dim,
        grid_shape=tuple(model.patch_embed.grid_size),
        **encoding_options,
    )
    model.pos_embed = None
    model.liere_encoding = pe
    rotations = RotationsForward(pe, model.num_prefix_tokens)
    for layer, block in enumerate(model.blocks):
        block.attn = RotaryTimmAttention(block.attn, rotations, layer)
    model.patch_embed.register_forward_hook(rotations.after_patch_embed)
    model.register_forward_hook(rotations.release)
    return model
