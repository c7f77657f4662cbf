"""timm's RoPE ViTs (its ``Eva`` class) on liere encodings, and rotary-encoding switches that keep the function.

``port_timm_rope(model)`` turns any timm ``Eva`` with rotary embeddings (naver rope-vit axial / mixed with or
without absolute embedding, ``vit_*_rope_reg*_gap_*``, EVA-02, DINOv3, PE-core) into a ``RotaryEva``: the same
modules and weights, its attention rotated by ``model.liere_encoding``, a ``RoPEMixed`` holding timm's
frequencies as a ``(depth, heads, axes, pairs)`` matrix: every timm 2D rotary embedding rotates feature pair
``j`` by ``sum_a c_a F[a, j]`` of coordinates ``c`` placed by timm's grid conventions (``timm_rope_coords``).
timm's fixed bands (``cat``, ``dinov3``) stay fixed (``requires_grad=False``); RoPE-Mixed's train.
The half ("rotate-half") pair layout is folded into the q/k projections (and q/k norms) as a feature
permutation, so liere's interleaved pairs compute the same scores.

``switch_encoding(model, spec)`` replaces the RoPE-Mixed encoding of a ported timm model, a ``liere_timm_vit``
model or a ``models.ViT`` by ``liere<b>`` (even ``b``), ``rope-basis`` or ``rope-mixed`` initialised to the same
rotations: logits are unchanged at the switch and the new parameters train from there.
"""

from __future__ import annotations

import math
import os

import torch
from timm.layers import AttentionRope
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from liere import rotary_attention
from liere.factory import parse_spec
from liere.integrations.forward_state import ForwardRotations, current_scope, rotation_scope
from liere.integrations.timm_common import RotaryScopeMixin, augment_coords, gather_positions
from liere.lie import LieRE
from liere.linalg import pair_block_params
from liere.rope import RoPEMixed
from liere.rope_basis import RoPEBasis

ROPE_KINDS = ("RotaryEmbeddingCat", "RotaryEmbeddingMixed", "RotaryEmbeddingDinoV3")


def timm_rope_coords(
    grid: tuple[int, int],
    *,
    grid_type: str = "index",
    ref_feat_shape: tuple[int, int] | None = None,
    grid_offset: float = 0.0,
    normalize_coords: str = "separate",
    grid_indexing: str = "ij",
) -> Tensor:
    """Patch coordinates ``(gh * gw, 2)`` (row-major) placed as timm's rotary embeddings place them.

    ``grid_type``: ``"index"`` (``i + grid_offset``), ``"pixel"`` (``linspace(-1, 1)``) or ``"centered"``
    (DINOv3: ``(i + 0.5 + grid_offset) / size`` mapped to ``[-1, 1]``, size per ``normalize_coords``);
    ``ref_feat_shape`` rescales each axis by ``ref / size`` (EVA); ``grid_indexing="xy"`` gives ``(col, row)``.
    """
    if normalize_coords not in ("separate", "min", "max"):
        raise ValueError(f"normalize_coords must be 'separate', 'min' or 'max', got {normalize_coords!r}")
    axes = []
    for a, size in enumerate(grid):
        if grid_type == "pixel":
            t = torch.linspace(-1.0, 1.0, steps=size)
        elif grid_type == "centered":
            denom = {"separate": size, "min": min(grid), "max": max(grid)}[normalize_coords]
            t = (torch.arange(0.5, size) + grid_offset) / float(denom)
        elif grid_type == "index":
            t = torch.arange(size).float() + grid_offset
        else:
            raise ValueError(f"grid_type must be 'index', 'pixel' or 'centered', got {grid_type!r}")
        if ref_feat_shape is not None:
            t = t / size * ref_feat_shape[a]
        axes.append(t)
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2)
    if grid_type == "centered":
        coords = 2.0 * coords - 1.0
    return coords.flip(-1) if grid_indexing == "xy" else coords


def rope_settings(rope: nn.Module) -> tuple[dict[str, object], Tensor, bool]:
    """timm rotary module -> (``timm_rope_coords`` options, frequencies ``(depth, heads, 2, pairs)``, half layout)."""
    kind = type(rope).__name__
    if kind not in ROPE_KINDS:
        raise TypeError(f"timm rotary embedding {kind} cannot be ported; supported: {ROPE_KINDS}")
    place: dict[str, object] = dict(grid_indexing=rope.grid_indexing)
    if kind == "RotaryEmbeddingMixed":
        return place, rope.freqs.detach().permute(1, 2, 0, 3).clone(), False
    if kind == "RotaryEmbeddingCat":
        bands = rope.bands.detach().float()
        ref = tuple(rope.ref_feat_shape) if rope.ref_feat_shape is not None else None
        place.update(grid_type=rope.grid_type, ref_feat_shape=ref, grid_offset=rope.grid_offset)
        place.update(normalize_coords=rope.normalize_coords)
    else:  # DINOv3: angle = 2 pi c / period
        bands = 2 * math.pi / rope.periods.detach().float()
        place.update(grid_type="centered", grid_offset=rope.grid_offset, normalize_coords=rope.normalize_coords)
    nb = bands.numel()
    freqs = torch.zeros(1, 1, 2, 2 * nb)  # pair a * nb + j follows axis a with band j
    freqs[0, 0, 0, :nb], freqs[0, 0, 1, nb:] = bands, bands
    return place, freqs, bool(rope.rotate_half)


def half_to_interleaved(head_dim: int) -> Tensor:
    """Feature order putting timm's half-layout pair ``(j, j + d/2)`` on liere's interleaved ``(2j, 2j + 1)``."""
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], dim=-1).flatten()


def permute_heads(t: Tensor, perm: Tensor, offset: int, heads: int) -> None:
    """Reorder, in place, the features of each of ``heads`` heads in rows ``[offset, offset + heads * d)``."""
    d = perm.numel()
    index = (torch.arange(heads)[:, None] * d + perm[None]).flatten() + offset
    rows = t.data[offset : offset + heads * d]
    rows.copy_(t.data[index.to(t.device)])


def fold_permutation(attn: nn.Module, perm: Tensor) -> None:
    """Fold the feature permutation ``perm`` of q and k into ``attn``'s projections and q/k norms (in place)."""
    heads, kv_heads = attn.num_heads, getattr(attn, "num_kv_heads", attn.num_heads)
    d = perm.numel()
    if attn.qkv is not None:
        for t in (attn.qkv.weight, attn.qkv.bias):
            if t is not None:
                permute_heads(t, perm, 0, heads)
                permute_heads(t, perm, heads * d, kv_heads)
        for name, n in (("q_bias", heads), ("k_bias", kv_heads)):
            if getattr(attn, name, None) is not None:
                permute_heads(getattr(attn, name), perm, 0, n)
    else:
        for proj, n in ((attn.q_proj, heads), (attn.k_proj, kv_heads)):
            for t in (proj.weight, proj.bias):
                if t is not None:
                    permute_heads(t, perm, 0, n)
    for norm in (attn.q_norm, attn.k_norm):
        for t in list(norm.parameters()) + list(norm.buffers()):
            if t.shape == (d,):
                t.data.copy_(t.data[perm.to(t.device)])


class RotaryEvaAttentionMixin:
    """The forward of timm's ``EvaAttention`` / ``AttentionRope`` with q, k rotated by the layer's liere rotations."""

    layer: int

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, n, _ = x.shape
        kv_heads = getattr(self, "num_kv_heads", self.num_heads)
        if self.qkv is not None:
            bias = None
            if getattr(self, "q_bias", None) is not None:
                bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = nn.functional.linear(x, self.qkv.weight, self.qkv.bias if bias is None else bias)
            q, k, v = qkv.reshape(batch, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(x).reshape(batch, n, self.num_heads, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(batch, n, kv_heads, -1).transpose(1, 2)
            v = self.v_proj(x).reshape(batch, n, kv_heads, -1).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        groups = self.num_heads // kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return q, k, v

    def forward(
        self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        """``x``: ``(B, n, dim)``; ``rope`` must be None (the rotations come from the model's liere encoding)."""
        if rope is not None:
            raise ValueError("a ported attention takes its rotations from the liere encoding, got a timm rope tensor")
        batch, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self._qkv(x)
        rot = current_scope().get(n).for_layer(self.layer)
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = rotary_attention(q, k, v, rot, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
        x = self.norm(x.transpose(1, 2).reshape(batch, n, -1))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class RotaryEvaAttention(RotaryEvaAttentionMixin, EvaAttention):
    """timm ``EvaAttention`` rotated by liere rotations (same submodules and keys)."""


class RotaryAttentionRope(RotaryEvaAttentionMixin, AttentionRope):
    """timm ``AttentionRope`` (PE-core) rotated by liere rotations (same submodules and keys)."""


class ScopedCheckpointMixin:
    """A block that checkpoints itself (``grad_checkpointing``), carrying the rotations into the recompute."""

    grad_checkpointing = False

    def forward(self, x: Tensor, rope: Tensor | None = None, **kwargs: object) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward_in, current_scope(), x, use_reentrant=False, **kwargs)
        return super().forward(x, rope=rope, **kwargs)

    def _forward_in(self, scope: ForwardRotations, x: Tensor, **kwargs: object) -> Tensor:
        with rotation_scope(scope):
            return super().forward(x, **kwargs)


class RotaryEvaBlock(ScopedCheckpointMixin, EvaBlock):
    """timm ``EvaBlock`` of a ported model."""


class RotaryEvaBlockPostNorm(ScopedCheckpointMixin, EvaBlockPostNorm):
    """timm ``EvaBlockPostNorm`` of a ported model."""


class RotaryPatchDropoutWithIndices(nn.Module):
    """timm's ``PatchDropoutWithIndices`` that also keeps each sample's rotations of the kept tokens."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        out, keep = self.inner(x)
        if keep is not None:
            scope = current_scope()
            scope.put(gather_positions(scope.get(x.shape[1]), keep, self.inner.num_prefix_tokens))
        return out, keep


class RotaryEva(RotaryScopeMixin, Eva):
    """A timm ``Eva`` ported by ``port_timm_rope``: rotations from ``liere_encoding`` once per forward."""

    rope_coords: dict[str, object]
    coord_augment: dict[str, float | None]

    def patch_coords(self, grid: tuple[int, int], device: torch.device) -> Tensor:
        """timm's coordinates of the patch grid, augmented (``coord_augment``) in training mode."""
        coords = timm_rope_coords(grid, **self.rope_coords)
        if self.training and any(v is not None for v in self.coord_augment.values()):
            coords = augment_coords(coords, *self.coord_augment.values())
        return coords.to(device)

    def _pos_embed(self, x: Tensor) -> tuple[Tensor, None]:
        grid = tuple(int(s) for s in x.shape[1:3]) if self.dynamic_img_size else tuple(self.patch_embed.grid_size)
        coords = self.patch_coords(grid, x.device)
        current_scope().put(self.liere_encoding(coords, num_prefix_tokens=self.num_prefix_tokens))
        return super()._pos_embed(x)


def create_pretrained(name: str, **create_kwargs: object) -> nn.Module:
    """``timm.create_model(name, pretrained=True, ...)``; offline or unreachable: a one-line ``RuntimeError``."""
    import timm

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") and "pretrained_cfg_overlay" not in create_kwargs:
        raise RuntimeError(
            f"{name}: pretrained weights need the Hugging Face Hub but HF_HUB_OFFLINE is set; pass "
            "pretrained_cfg_overlay=dict(file=PATH) to read a local file"
        )
    try:
        return timm.create_model(name, pretrained=True, **create_kwargs)
    except Exception as error:  # network, missing file, hub errors: one line naming the model
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RuntimeError(f"{name}: could not load timm's pretrained weights ({first})") from None


def port_timm_rope(model: str | nn.Module, *, pretrained: bool = False, **create_kwargs: object) -> RotaryEva:
    """timm RoPE ViT ``model`` (an ``Eva`` or its timm name) -> a ``RotaryEva`` on liere encodings, same logits.

    A name is created with ``timm.create_model(name, pretrained=pretrained, **create_kwargs)`` (``pretrained``
    downloads timm's weights; offline, ``pretrained_cfg_overlay=dict(file=PATH)`` reads a local file). A given
    model is converted in place (after every check passed). Train-time coordinate augmentation
    (``rope_shift_coords`` ...) is ported: same transforms and random draws as timm, in training mode only.
    """
    if isinstance(model, str):
        if pretrained:
            model = create_pretrained(model, **create_kwargs)
        else:
            import timm

            model = timm.create_model(model, pretrained=False, **create_kwargs)
    elif create_kwargs or pretrained:
        raise ValueError("pretrained and create_kwargs only apply when model is a timm model name")
    if not isinstance(model, Eva) or isinstance(model, RotaryEva):
        raise TypeError(f"model must be a timm Eva (timm's RoPE ViTs) or its name, got {type(model).__name__}")
    if model.rope is None:
        raise ValueError(f"{type(model).__name__} has no rotary embedding (use_rot_pos_emb=False): nothing to port")
    attn_classes = {EvaAttention: RotaryEvaAttention, AttentionRope: RotaryAttentionRope}
    block_classes = {EvaBlock: RotaryEvaBlock, EvaBlockPostNorm: RotaryEvaBlockPostNorm}
    for block in model.blocks:
        if type(block) not in block_classes or type(block.attn) not in attn_classes:
            raise TypeError(f"cannot port block {type(block).__name__} with {type(block.attn).__name__}")
    place, freqs, half = rope_settings(model.rope)
    head_dim = model.blocks[0].attn.head_dim
    pe = RoPEMixed(head_dim=head_dim, num_axes=2, num_heads=freqs.shape[1], depth=freqs.shape[0])
    if pe.freqs.shape != freqs.shape:
        raise ValueError(f"timm's rotary frequencies {tuple(freqs.shape)} do not fit head_dim={head_dim}")
    with torch.no_grad():
        pe.freqs.copy_(freqs)
    pe.freqs.requires_grad_(type(model.rope).__name__ == "RotaryEmbeddingMixed")
    augment = {name: getattr(model.rope, name, None) for name in ("shift_coords", "jitter_coords", "rescale_coords")}
    # every check passed: convert
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            if half:
                fold_permutation(block.attn, half_to_interleaved(head_dim))
            block.attn.__class__ = attn_classes[type(block.attn)]
            block.attn.layer = layer
            block.__class__ = block_classes[type(block)]
    if model.patch_drop is not None:
        model.patch_drop = RotaryPatchDropoutWithIndices(model.patch_drop)
    model.__class__ = RotaryEva
    model.rope, model.rope_mixed = None, False
    model.liere_encoding = pe.to(next(model.parameters()).device)
    model.rope_coords, model.coord_augment = place, augment
    return model


# ----------------------------------------------------------------------------------- switching encodings
SWITCH_TARGETS = ("liere<b>", "rope-mixed", "rope-basis")


def encoding_owner(model: nn.Module) -> tuple[str, int, int]:
    """(attribute holding the encoding, depth, heads) of a ported / adapted timm model or a ``models.ViT``."""
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, (Eva, VisionTransformer)) and hasattr(model, "liere_encoding"):
        return "liere_encoding", len(model.blocks), model.blocks[0].attn.num_heads
    from models import ViT

    if isinstance(model, ViT):
        return "encoding", len(model.transformer.blocks), getattr(model.encoding, "num_heads", 1)
    raise TypeError(f"model must be a ported/adapted timm model or a models.ViT, got {type(model).__name__}")


def pair_frequencies(source: nn.Module) -> Tensor:
    """The frequencies ``(depth, heads, axes, pairs)`` of a RoPE whose pair angles are linear in the coordinates
    (``RoPEMixed``, ``AxialRoPE``, ``RoPE``: read off the rotations of the unit coordinates, then checked)."""
    if isinstance(source, RoPEMixed):
        return source.freqs.detach()
    axes = getattr(source, "num_axes", None)
    device = next((t.device for t in [*source.parameters(), *source.buffers()]), torch.device("cpu"))
    rot = source(torch.eye(axes, device=device)) if isinstance(axes, int) else None
    if rot is None or rot.kind != "pairs":
        raise TypeError(f"switch_encoding starts from a RoPE (rotations of feature pairs), got {type(source).__name__}")
    freqs = torch.atan2(rot.sin, rot.cos)[:, 0]  # position a is the unit vector of axis a: (depth, H, axes, pairs)
    probe = (torch.rand(16, axes, generator=torch.Generator().manual_seed(0)) * 8).to(device)
    angles = torch.einsum("na,dhap->dhnp", probe, freqs)
    check = source(probe)
    if not (
        torch.allclose(check.cos[:, 0], angles.cos(), atol=1e-5)
        and torch.allclose(check.sin[:, 0], angles.sin(), atol=1e-5)
    ):
        raise TypeError(
            f"{type(source).__name__}: its angles are not linear in the coordinates, so no switch keeps them"
        )
    return freqs


def switched_encoding(source: nn.Module, spec: str, depth: int, heads: int) -> nn.Module:
    """A new encoding of kind ``spec`` computing ``source``'s RoPE rotations, with its own parameters per layer and
    head."""
    name, options = parse_spec(spec)
    if options:
        raise ValueError(f"switch_encoding takes a plain spec (one of {SWITCH_TARGETS}), got {spec!r}")
    freqs = pair_frequencies(source)
    if 2 * freqs.shape[-1] != source.head_dim:
        raise ValueError(
            f"switch_encoding needs rotations over the whole head ({2 * freqs.shape[-1]} of {source.head_dim})"
        )
    freqs = freqs.expand(depth, heads, -1, -1).clone()
    dims = dict(head_dim=source.head_dim, num_axes=source.num_axes, num_heads=heads, depth=depth)
    if name == "rope-mixed":
        new: nn.Module = RoPEMixed(**dims)
        state = {"freqs": freqs}
    elif name == "rope-basis":
        new = RoPEBasis(**dims)
        state = {"freqs": freqs, "skew": torch.zeros_like(new.skew), "basis": new.basis.detach().clone()}
        state["basis"].copy_(torch.eye(new.rot_dim))
    elif name.startswith("liere") and name[5:].isdigit():
        b = int(name[5:])
        if b < 2 or source.head_dim % b:
            raise ValueError(f"{spec}: block size {b} must be >= 2 and divide head_dim={source.head_dim}")
        if b % 2:
            raise ValueError(f"{spec}: an odd block size cannot hold whole rotation pairs, so it cannot keep RoPE's")
        new = LieRE(**dims, block_size=b, init="normal")
        state = {"generators": pair_block_params(freqs.unflatten(-1, (source.head_dim // b, b // 2)), b)}
    else:
        raise ValueError(f"switch_encoding keeps the function when it can switch to {SWITCH_TARGETS}, got {spec!r}")
    new.load_state_dict(state)
    return new.to(freqs.device)


def switch_encoding(model: nn.Module, spec: str) -> nn.Module:
    """Replace ``model``'s RoPE-Mixed encoding by ``spec`` (``liere<b>`` with even ``b`` dividing the head width,
    ``rope-mixed``, ``rope-basis``) initialised to the same rotations for every layer and head: logits unchanged,
    every new parameter trainable. Works on ``port_timm_rope`` / ``liere_timm_vit`` models and ``models.ViT``;
    raises (model untouched) for a switch that would change the function. Returns ``model``."""
    attr, depth, heads = encoding_owner(model)
    new = switched_encoding(getattr(model, attr), spec, depth, heads)
    setattr(model, attr, new)
    return model
