"""x-transformers adapter: any 1D liere encoding in an x-transformers decoder, rotating q and k after qk-norm.

See docs/x_transformers.md for why the ``rotary_pos_emb`` hook cannot carry LieRE and what this supports.
"""

from __future__ import annotations

from torch import Tensor, nn
from x_transformers.x_transformers import Attention, AttentionLayers, TransformerWrapper, always

from liere import Grid, PositionEncoding, build
from liere.attention import repeat_heads
from liere.integrations.forward_state import ForwardRotations, close_scope, current_scope, open_scope

UNSUPPORTED_KWARGS = ("mems", "context", "rotary_pos_emb")


class HeadRotation(nn.Module):
    """Rotates one layer's queries or keys ``(b, heads, n, head_dim)`` where x-transformers applies its own rotary
    embedding: after the head split and qk-norm (l2 or RMS, with their scales), before the kv cache.

    Installed as the attention's ``q_rmsnorm``/``k_rmsnorm`` when it has none, else run on that norm's output (a
    forward hook: state-dict keys unchanged). The rotations come from the running forward's scope
    (``liere.integrations.forward_state``), for the tokens these heads hold: all of them, or only the new ones when
    decoding with a kv cache (whose keys are stored rotated). Rotations per key/value head are shared by the
    ``group`` query heads of each group.
    """

    def __init__(self, layer: int, group: int = 1) -> None:
        super().__init__()
        self.layer, self.group = layer, group

    def forward(self, x: Tensor) -> Tensor:
        return repeat_heads(current_scope().get(x.shape[2]).for_layer(self.layer), self.group).apply(x)

    def after(self, _module: nn.Module, _args: tuple, out: Tensor) -> Tensor:
        """Forward hook form: rotate the output of the norm it is registered on."""
        return self(out)


def place(attn: Attention, name: str, rotation: HeadRotation) -> None:
    """Put ``rotation`` at ``attn``'s ``q_rmsnorm``/``k_rmsnorm`` slot (``name``): that norm, then the rotation."""
    norm = getattr(attn, name)
    if norm is None:
        setattr(attn, name, rotation)
    else:
        norm.register_forward_hook(rotation.after)


def trimmed_tokens(cache: object) -> int:
    """Tokens x-transformers dropped from the front of ``cache`` when decoding past ``max_seq_len``: its
    ``cache_length`` counts every token seen, its cached keys only the kept window."""
    kept = [inter.cached_kv[0].shape[-2] for inter in cache.attn_intermediates if inter.cached_kv is not None]
    return cache.cache_length - kept[0] if kept else 0


def token_positions(x: Tensor, kwargs: dict) -> Tensor | int:
    """Positions of all ``x.shape[1] + offset`` tokens: ``pos`` (custom integer positions ``(n,)`` or ``(b, n)``)
    if given, else the end of ``0 .. end - 1`` (an int).

    The offset is x-transformers' ``seq_pos_offset`` (the cache length when decoding with a cache). Positions are
    absolute: past ``max_seq_len`` x-transformers trims the cache's oldest keys, and the window (which ``x``
    holds) then starts at the first kept token, so the tokens trimmed are added back (``trimmed_tokens``): the kept
    keys keep the positions they were rotated at. Left padding (``seq_start_pos``) does not shift them:
    x-transformers masks the padding and keeps the positions, and every 1D rotary encoding is relative.
    """
    if kwargs.get("pos") is not None:
        pos = kwargs["pos"]
        if pos.dtype.is_floating_point or pos.dim() not in (1, 2):
            raise ValueError(f"pos must be integer positions (n,) or (b, n), got {pos.dtype} {tuple(pos.shape)}")
        return pos
    cache, offset = kwargs.get("cache"), kwargs.get("seq_pos_offset")
    if offset is None:
        offset = cache.cache_length if cache is not None else 0
    if cache is not None and not kwargs.get("input_not_include_cache"):
        offset += trimmed_tokens(cache)
    return x.shape[1] + offset


def _open(layers: AttentionLayers, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the adapted ``AttentionLayers``: open this forward's rotations scope."""
    given = [name for name in UNSUPPORTED_KWARGS if kwargs.get(name) is not None]
    if given:
        raise ValueError(f"liere adapter: {given} not supported (they change positions the adapter does not see)")
    x = args[0] if args else kwargs["x"]
    positions = token_positions(x, kwargs)
    pe = layers.liere_encoding

    def compute(n: int) -> object:  # the last n positions (the tokens whose q and k are rotated)
        if isinstance(positions, int):  # implicit positions: a Grid, sliced from the position table at inference
            return pe(Grid((n,), offset=float(positions - n)))
        return pe(positions[..., -n:, None])  # integer positions: rows of the same table

    open_scope(ForwardRotations(compute))


def _close(*_: object) -> None:
    """Forward hook (always called, also on errors): release this forward's rotations."""
    close_scope()


def liere_x_transformers(
    model: TransformerWrapper | AttentionLayers, encoding: str = "liere8", **options: object
) -> PositionEncoding:
    """Put the 1D encoding ``encoding`` (a ``liere.build`` spec) into ``model``'s self-attention layers.

    Returns the encoding, registered as ``attn_layers.liere_encoding``, with one parameter set per layer and key/value
    head (grouped kv heads, ``attn_kv_heads``: the query heads of a group share their key/value head's rotations).
    Needs no x-transformers positional embedding (``use_abs_pos_emb=False``, ``rotary_pos_emb=False``), no
    cross-attention, memory or latent kv; qk-norm (``attn_qk_norm``, ``attn_qk_rmsnorm``) acts before the rotations.
    Supports x-transformers' kv cache (``generate(cache_kv=True)``, ``cache=``, also past ``max_seq_len``: positions
    stay absolute, see ``token_positions``), ``seq_start_pos`` (left-padded prompts) and integer ``pos``.
    The adapted model deep-copies, pickles and saves like any module (nothing per forward is stored on it).
    """
    layers = model.attn_layers if isinstance(model, TransformerWrapper) else model
    if isinstance(model, TransformerWrapper) and (not isinstance(model.pos_emb, always) or model.num_memory_tokens):
        raise ValueError("build the TransformerWrapper with use_abs_pos_emb=False and no memory tokens")
    if not isinstance(layers, AttentionLayers) or layers.rotary_pos_emb is not None or layers.cross_attend:
        raise ValueError("model must be x-transformers self-attention layers built with rotary_pos_emb=False")
    attns = [m for m in layers.modules() if isinstance(m, Attention)]
    if any(attn.use_latent_kv for attn in attns):
        raise ValueError("latent kv is not supported (its decoupled rotary heads bypass the key heads)")
    heads, kv_heads = attns[0].heads, attns[0].kv_heads
    head_dim = attns[0].to_q.out_features // heads
    pe = build(encoding, head_dim=head_dim, num_axes=1, num_heads=kv_heads, depth=len(attns), **options)
    layers.liere_encoding = pe
    layers.register_forward_pre_hook(_open, with_kwargs=True)
    layers.register_forward_hook(_close, always_call=True)
    for layer, attn in enumerate(attns):
        place(attn, "q_rmsnorm", HeadRotation(layer, heads // kv_heads))
        place(attn, "k_rmsnorm", HeadRotation(layer))
    return pe
