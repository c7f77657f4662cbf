"""Put any ``liere`` encoding into a timm ``VisionTransformer``.

``liere_timm_vit(model, "liere8")`` keeps timm's model, weights layout and API and changes four things:

- the model becomes a ``RotaryVisionTransformer`` (a ``VisionTransformer`` subclass): ``forward_features`` and
  ``forward_intermediates`` compute the rotations ONCE per call, in ``_pos_embed`` (from the patch grid, with
  the CLS/register tokens as unrotated prefix tokens) and hand them to the attention layers through a
  per-call scope (``liere.integrations.forward_state``): nothing per forward is stored on a module, so the
  model deep-copies (EMA), pickles, saves whole, and runs in several threads at once;
- timm's learned ``pos_embed`` is removed (``keep_pos_embed=True`` keeps it as an additive term); the
  encoding is attached as ``model.liere_encoding``. Only the spec ``"abs"`` returns timm's model as is;
- every block's ``Attention`` is replaced by ``RotaryTimmAttention`` (same submodules, so the same state-dict
  keys) and the block becomes a ``RotaryTimmBlock``, which carries the rotations into activation
  checkpointing's recompute (``set_grad_checkpointing()``);
- patch dropout (``patch_drop_rate``) gathers each sample's rotations with its kept tokens.

Coordinates (``coord_scale``): ``"index"`` (patch indices, default), ``"stretch"`` (any grid spans the
training grid's range) or ``"unit"`` (each axis in ``[0, 1]``, the LieRE paper's convention). ``axis_order``:
``"ij"`` (default) gives each patch the coordinates ``(row, col)``, ``"xy"`` gives ``(col, row)``, as timm's
``rope_grid_indexing="xy"`` (its naver-ai rope-vit models).
``no_weight_decay()`` lists the encoding's parameters, so ``timm.optim.create_optimizer_v2`` leaves them
undecayed. ``load_timm_weights`` loads a plain timm state dict (pretrained weights) into an adapted model.
``port_timm_rope`` and ``switch_encoding`` (``liere.integrations.timm_rope``) are importable from here too.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import timm
import torch
from timm.layers import Attention, PatchDropout
from timm.layers.patch_dropout import patch_dropout_forward
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from liere import Grid, freeze, rotary_attention
from liere.factory import build, parse_spec
from liere.fx import is_symbolic_tracing
from liere.integrations.forward_state import ForwardRotations, current_scope, rotation_scope
from liere.integrations.timm_common import RotaryScopeMixin, augment_coords, gather_positions
from liere.integrations.timm_rope import port_timm_rope, switch_encoding  # noqa: F401  (re-exported)

COORD_SCALES = ("index", "stretch", "unit")
AXIS_ORDERS = ("ij", "xy")
COORD_AUGMENTS = ("shift_coords", "jitter_coords", "rescale_coords")


class RotaryPatchDropout(PatchDropout):
    """timm's ``PatchDropout`` that also keeps the rotations of the kept tokens (per sample)."""

    def forward(self, x: Tensor) -> Tensor:
        out, keep = patch_dropout_forward(x, self.prob, self.num_prefix_tokens, self.ordered, self.training)
        if keep is not None:
            scope = current_scope()
            scope.put(gather_positions(scope.get(x.shape[1]), keep, self.num_prefix_tokens))
        return out


class RotaryTimmAttention(nn.Module):
    """timm ``Attention`` whose q and k are rotated by its layer's rotations; same submodules and keys."""

    def __init__(self, attn: Attention, layer: int) -> None:
        super().__init__()
        for name, child in attn.named_children():
            self.add_module(name, child)
        if "gate" not in self._modules:
            self.gate = None
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        self.layer = layer

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """timm's ``Attention.forward`` (fused path) with ``rotary_attention``; ``x``: ``(B, n, dim)``."""
        batch, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        rot = current_scope().get(n).for_layer(self.layer)
        x = rotary_attention(q, k, v, rot, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
        x = self.norm(x.transpose(1, 2).reshape(batch, n, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class RotaryTimmBlock(Block):
    """timm ``Block`` that checkpoints itself (``grad_checkpointing``), passing the rotations to the recompute."""

    grad_checkpointing = False

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward_in, current_scope(), x, attn_mask, is_causal, use_reentrant=False)
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)

    def _forward_in(self, scope: ForwardRotations, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        with rotation_scope(scope):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)


def check_fx_traceable(model: VisionTransformer) -> None:
    """Raise, naming the option, when ``model`` has behaviour a ``torch.fx`` graph (fixed sizes, no per-call random
    draws outside tensors) cannot hold: a dynamic image size, or train-time coordinate augmentation."""
    if model.dynamic_img_size:
        raise NotImplementedError(
            "torch.fx tracing needs a fixed image size: create the model with dynamic_img_size=False"
        )
    if model.training and any(v is not None for v in model.coord_augment.values()):
        raise NotImplementedError(
            "torch.fx tracing in training mode with coordinate augmentation (shift_coords, jitter_coords, "
            "rescale_coords) would freeze one random draw; trace in eval mode or without augmentation"
        )


class RotaryVisionTransformer(RotaryScopeMixin, VisionTransformer):
    """A timm ``VisionTransformer`` adapted by ``liere_timm_vit`` (see the module docstring)."""

    coord_scale: str
    axis_order: str = "ij"  # the default of models adapted (and saved whole) before the option existed
    train_grid: tuple[int, int]
    coord_augment: dict[str, float | None]

    def patch_coords(self, grid: tuple[int, int], device: torch.device) -> Grid | Tensor:
        """The patch grid ``(gh, gw)`` placed according to ``coord_scale``: a ``Grid`` (nothing to validate, no
        device sync), or its ``(gh * gw, 2)`` coordinates when they are ``(col, row)`` (``axis_order="xy"``) or, in
        training mode, augmented (``shift_coords`` ...; after the axis order, as timm)."""
        if self.coord_scale == "unit":
            spacing = [1 / (g - 1) if g > 1 else 1.0 for g in grid]
        elif self.coord_scale == "stretch":
            spacing = [(t - 1) / (g - 1) if g > 1 else 1.0 for t, g in zip(self.train_grid, grid, strict=True)]
        else:
            spacing = [1.0, 1.0]
        placed: Grid | Tensor = Grid(grid, tuple(spacing))
        if self.axis_order == "xy":
            placed = placed.coords(device).flip(-1)
        augment = [self.coord_augment.get(name) for name in COORD_AUGMENTS]
        if self.training and any(a is not None for a in augment):
            return augment_coords(placed if isinstance(placed, Tensor) else placed.coords(device), *augment)
        return placed

    def freeze_rotations(self) -> RotaryVisionTransformer:
        """Freeze the encoding's rotations at the image size (``liere.freeze``), in eval mode: for compiled or
        exported serving."""
        if self.training:
            raise RuntimeError("freeze_rotations: call model.eval() first (training mode augments the coordinates)")
        device = next(self.parameters()).device
        return freeze(self, self.patch_coords(tuple(self.patch_embed.grid_size), device))

    def _pos_embed(self, x: Tensor) -> Tensor:
        """Prefix tokens (+ timm's ``pos_embed`` if kept), any absolute liere embedding; this call's rotations.

        Under ``torch.fx`` symbolic tracing sizes are unknown: the grid is ``patch_embed.grid_size`` (a traced graph
        has a fixed image size, as timm's own), and what cannot be traced is refused.
        """
        if is_symbolic_tracing():
            check_fx_traceable(self)
            grid = tuple(self.patch_embed.grid_size)
        else:
            grid = tuple(int(s) for s in x.shape[1:3]) if x.dim() == 4 else tuple(self.patch_embed.grid_size)
        coords = self.patch_coords(grid, x.device)
        patches = self.liere_encoding.add_to_tokens(x.reshape(x.shape[0], -1, x.shape[-1]), coords)
        x = super()._pos_embed(patches.reshape(x.shape))
        current_scope().put(self.liere_encoding(coords, num_prefix_tokens=self.num_prefix_tokens))
        return x


def liere_timm_vit(
    model: str | VisionTransformer,
    encoding: str = "liere8",
    *,
    create_kwargs: dict[str, object] | None = None,
    coord_scale: str = "index",
    axis_order: str = "ij",
    keep_pos_embed: bool = False,
    shift_coords: float | None = None,
    jitter_coords: float | None = None,
    rescale_coords: float | None = None,
    **encoding_options: object,
) -> VisionTransformer:
    """Give a timm ViT the position encoding ``encoding`` (a ``liere.build`` spec); modifies ``model`` in place.

    ``model`` is a ``VisionTransformer`` or a timm model name, created with ``timm.create_model(name,
    **create_kwargs)`` (``pretrained=True`` loads timm's weights first; offline, point timm at a local file
    with ``pretrained_cfg_overlay=dict(file=path)``). The encoding is built with ``head_dim``/``num_heads``
    of the attention layers, ``depth`` = number of blocks, ``dim`` = embed dim, ``grid_shape`` = the patch
    grid, and ``encoding_options``. ``coord_scale``: ``"index"``, ``"stretch"`` or ``"unit"``; ``axis_order``:
    ``"ij"`` (patch coordinates ``(row, col)``) or ``"xy"`` (``(col, row)``, timm's ``rope_grid_indexing="xy"``).
    ``keep_pos_embed`` keeps timm's learned ``pos_embed`` as an additive term beside the encoding.
    ``shift_coords``, ``jitter_coords``, ``rescale_coords``: timm's train-time coordinate augmentation
    (``augment_coords``; shift >= 0, factors >= 1). Returns the model (now a ``RotaryVisionTransformer``).
    """
    if isinstance(model, str):
        model = timm.create_model(model, **({"pretrained": False} | (create_kwargs or {})))
    elif create_kwargs:
        raise ValueError("create_kwargs only apply when model is a timm model name")
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer or its name, got {type(model).__name__}")
    if coord_scale not in COORD_SCALES:
        raise ValueError(f"coord_scale must be one of {COORD_SCALES}, got {coord_scale!r}")
    if axis_order not in AXIS_ORDERS:
        raise ValueError(f"axis_order must be one of {AXIS_ORDERS}, got {axis_order!r}")
    augment = dict(shift_coords=shift_coords, jitter_coords=jitter_coords, rescale_coords=rescale_coords)
    for name, value in augment.items():
        low = 0.0 if name == "shift_coords" else 1.0
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
            raise ValueError(f"{name} must be a finite number >= {low:g} or None, got {value!r}")
    if parse_spec(encoding)[0] == "abs":
        return model  # timm's own learned absolute embedding
    if type(model) is not VisionTransformer:
        raise TypeError(f"only timm's VisionTransformer itself can be adapted, got {type(model).__name__}")
    if any(type(block) is not Block or type(block.attn) is not Attention for block in model.blocks):
        kinds = sorted({f"{type(b).__name__}/{type(b.attn).__name__}" for b in model.blocks})
        raise TypeError(f"only timm's plain Block with Attention can be adapted, got {kinds}")
    attns = [block.attn for block in model.blocks]
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
    model.__class__ = RotaryVisionTransformer
    if not keep_pos_embed:
        model.pos_embed = None
    model.liere_encoding = pe
    model.coord_scale, model.axis_order, model.train_grid = coord_scale, axis_order, tuple(model.patch_embed.grid_size)
    model.coord_augment = augment
    if isinstance(model.patch_drop, PatchDropout):
        drop = model.patch_drop
        model.patch_drop = RotaryPatchDropout(drop.prob, drop.num_prefix_tokens, drop.ordered)
    for layer, block in enumerate(model.blocks):
        block.attn = RotaryTimmAttention(block.attn, layer)
        block.__class__ = RotaryTimmBlock
    return model


class LoadReport(NamedTuple):
    """What ``load_timm_weights`` did: encoding parameters left at their init, timm keys dropped."""

    new_encoding_params: list[str]
    dropped: list[str]


def load_timm_weights(model: RotaryVisionTransformer, state_dict: dict[str, Tensor]) -> LoadReport:
    """Load a plain timm ViT ``state_dict`` (e.g. pretrained weights) into an adapted ``model``.

    Every timm key must match (strict), except ``pos_embed``: dropped, or loaded as the additive term when
    the model was adapted with ``keep_pos_embed=True`` (resampled by timm if the grid differs). The
    encoding's parameters keep their initialisation; they are listed in the report.
    """
    if not isinstance(model, RotaryVisionTransformer):
        raise TypeError(f"model must come from liere_timm_vit, got {type(model).__name__}")
    state = dict(state_dict)
    dropped = []
    if "pos_embed" in state and model.pos_embed is None:
        del state["pos_embed"]
        dropped.append("pos_embed")
    elif "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    new = [k for k in missing if k.startswith("liere_encoding.")]
    if unexpected or len(new) != len(missing):
        wrong = sorted(set(missing) - set(new))
        raise ValueError(f"state_dict does not fit the adapted model: missing {wrong}, unexpected {unexpected}")
    return LoadReport(new, dropped)
