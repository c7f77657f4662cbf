"""x-transformers adapter: LieRE (or any liere encoding) in an x-transformers decoder via its q/k projections.

See docs/x_transformers.md for why the ``rotary_pos_emb`` hook cannot carry LieRE and what this supports.
"""

from __future__ import annotations

from torch import Tensor, nn
from x_transformers.x_transformers import Attention, AttentionLayers, TransformerWrapper, always

from liere import Grid, PositionEncoding, build

UNSUPPORTED_KWARGS = ("cache", "mems", "pos", "seq_start_pos", "context", "rotary_pos_emb")


class RotatedLinear(nn.Linear):
    """x-transformers' ``to_q``/``to_k`` followed by one layer's rotations (same weights, same keys)."""

    def __init__(self, linear: nn.Linear, heads: int, state: dict, layer: int) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.heads, self.state, self.layer = heads, state, layer

    def forward(self, x: Tensor) -> Tensor:
        """``(b, n, heads * head_dim)`` projections, rotated per head at positions ``0..n-1``."""
        out = super().forward(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (b, heads, n, head_dim)
        return self.state["rot"].for_layer(self.layer).apply(out).transpose(1, 2).flatten(-2)


def liere_x_transformers(
    model: TransformerWrapper | AttentionLayers, encoding: str = "liere8", **options: object
) -> PositionEncoding:
    """Put the 1D encoding ``encoding`` (a ``liere.build`` spec) into ``model``'s self-attention layers.

    Returns the encoding, registered as ``attn_layers.liere_encoding``. Needs no x-transformers positional
    embedding (``use_abs_pos_emb=False``, ``rotary_pos_emb=False``), no qk-norm, ``kv_heads == heads``, no
    cross-attention or memory, and no kv cache (``generate`` then runs without it).
    """
    layers = model.attn_layers if isinstance(model, TransformerWrapper) else model
    if isinstance(model, TransformerWrapper):
        if not isinstance(model.pos_emb, always) or model.num_memory_tokens:
            raise ValueError("build the TransformerWrapper with use_abs_pos_emb=False and no memory tokens")
        model.can_cache_kv = False
    if not isinstance(layers, AttentionLayers) or layers.rotary_pos_emb is not None or layers.cross_attend:
        raise ValueError("model must be x-transformers self-attention layers built with rotary_pos_emb=False")
    attns = [m for m in layers.modules() if isinstance(m, Attention)]
    for attn in attns:
        if attn.qk_norm or attn.q_rmsnorm is not None or attn.kv_heads != attn.heads or attn.use_latent_kv:
            raise ValueError("qk-norm, grouped kv heads and latent kv are not supported (they act after to_q/to_k)")
    heads = attns[0].heads
    pe = build(encoding, head_dim=attns[0].to_q.out_features // heads, num_heads=heads, depth=len(attns), **options)
    layers.liere_encoding = pe
    state: dict = {}

    def compute_rotations(module: nn.Module, args: tuple, kwargs: dict) -> None:
        given = [name for name in UNSUPPORTED_KWARGS if kwargs.get(name) is not None]
        if given or kwargs.get("seq_pos_offset"):
            raise ValueError(f"liere adapter: {given} not supported (positions are 0..n-1, no kv cache)")
        x = args[0] if args else kwargs["x"]
        state["rot"] = pe(Grid((x.shape[1],)))

    layers.register_forward_pre_hook(compute_rotations, with_kwargs=True)
    for layer, attn in enumerate(attns):
        attn.to_q = RotatedLinear(attn.to_q, heads, state, layer)
        attn.to_k = RotatedLinear(attn.to_k, heads, state, layer)
    return pe
