"""Encoding-agnostic transformer pieces shared by the ViT and the char LM.

Every block takes ``(x, rot)`` where ``rot`` is that layer's ``Rotations`` (``rot.for_layer(i)``); the
identity rotations of additive encodings make the same code path serve every factory spec.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without torch.distributed: nothing is ever sharded
    DTensor = distribute_tensor = None

from liere import PositionEncoding, Rotations, build, rotary_attention
from liere.encoding import check_positive_int


def check_heads(dim: int, heads: int) -> int:
    """Per-head width ``dim // heads``, after checking both are positive and ``heads`` divides ``dim``."""
    check_positive_int(dim, "dim")
    check_positive_int(heads, "heads")
    if dim % heads:
        raise ValueError(f"dim={dim} must be divisible by heads={heads}")
    return dim // heads


class KVCache:
    """Rotated keys and values of the tokens decoded so far, one ``(k, v)`` pair per layer.

    Pass the same cache to successive ``CharLM`` forwards to decode incrementally: each forward appends its
    tokens' keys (already rotated at their positions) and values, so a new token costs one rotation at its own
    position plus attention over the cache. ``length`` is the number of cached tokens (the next position).
    """

    def __init__(self) -> None:
        self.layers: list[tuple[Tensor, Tensor] | None] = []

    @property
    def length(self) -> int:
        return 0 if not self.layers or self.layers[0] is None else self.layers[0][0].shape[2]

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k``, ``v`` ``(batch, heads, n, head_dim)`` to layer ``layer``; return all keys and values."""
        while len(self.layers) <= layer:
            self.layers.append(None)
        past = self.layers[layer]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection; q and k are rotated by ``rot`` inside SDPA."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, check_heads(dim, heads)
        self.causal, self.dropout = causal, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, rot: Rotations, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """``x``: ``(batch, n, dim)``, ``rot``: depth-1 rotations for ``n`` positions -> ``(batch, n, dim)``.

        With a (causal) ``cache``, the ``n`` tokens follow the cached ones: their rotated keys and values are
        appended to ``cache`` (slot ``layer``) and they attend to the cache and causally among themselves.
        """
        n = x.shape[1]
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            out = rotary_attention(q, k, v, rot, is_causal=self.causal, dropout_p=dropout_p)
        else:
            if not self.causal:
                raise ValueError("a kv cache needs causal attention")
            q, k = rot.apply(torch.cat([q, k])).chunk(2)  # one pass over the rotations for both
            k, v = cache.extend(layer, k, v)
            past = k.shape[2] - n
            mask = None if n == 1 else torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))


class MLP(nn.Sequential):
    """``Linear -> GELU -> Dropout -> Linear -> Dropout`` with hidden width ``mlp_ratio * dim``."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        hidden = int(dim * mlp_ratio)
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x), rot)`` then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, causal: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)

    def forward(self, x: Tensor, rot: Rotations, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.norm1(x), rot, cache, layer)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """``depth`` pre-norm blocks; block ``i`` gets ``rot.for_layer(i)``."""

    def __init__(
        self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, causal: bool = False
    ) -> None:
        super().__init__()
        check_positive_int(depth, "depth")
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, causal) for _ in range(depth))

    def forward(self, x: Tensor, rot: Rotations, cache: KVCache | None = None) -> Tensor:
        """``x``: ``(batch, n, dim)``; ``rot``: rotations of depth 1 (shared) or ``depth`` for ``n`` positions.

        ``cache``: decode incrementally (``KVCache``); the ``n`` tokens follow the cached ones."""
        if rot.depth not in (1, len(self.blocks)):
            raise ValueError(f"rotations have depth {rot.depth}, expected 1 or {len(self.blocks)} (one per block)")
        for i, block in enumerate(self.blocks):
            x = block(x, rot.for_layer(i), cache, i)
        return x


WEIGHT_INITS = ("trunc_normal", "xavier")


def check_weight_init(scheme: str) -> str:
    """Return ``scheme`` if it is one of ``WEIGHT_INITS``, else raise naming ``weight_init``."""
    if scheme not in WEIGHT_INITS:
        raise ValueError(f"weight_init must be one of {WEIGHT_INITS}, got {scheme!r}")
    return scheme


def init_weights(model: nn.Module, scheme: str = "trunc_normal", normal: Iterable[tuple[nn.Module, str]] = ()) -> None:
    """Initialise every ``nn.Linear`` in ``model`` (weights by ``scheme``, biases zero), then the parameters
    ``getattr(module, name)`` of ``normal`` by ``trunc_normal(std=0.02)`` (tokens and embeddings).

    ``"trunc_normal"`` is timm's ViT default, ``std=0.02`` at any width. ``"xavier"`` is ``xavier_uniform``
    (timm's ``jax`` scheme), ``std = sqrt(2 / (fan_in + fan_out))``: at width 64 that is 4x larger, so the
    initial attention logits are ~20x larger and attention starts learning at once instead of after a
    seed-dependent plateau (RESULTS.md, "Stability"). Sharded (FSDP) parameters get the values of an unsharded
    model (``full_parameters``).
    """
    check_weight_init(scheme)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            with full_parameters(module):
                if scheme == "xavier":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    for module, name in normal:
        with full_parameters(module):
            nn.init.trunc_normal_(getattr(module, name), std=0.02)


def reset_submodules(model: nn.Module) -> None:
    """Call every submodule's own ``reset_parameters()`` (linear, conv, norm and embedding layers, the position
    encoding) in registration order, which is construction order: the random numbers a construction draws, drawn
    again in the same order, so that a ``meta``-built, ``to_empty``'d model can be initialised like a normal one."""
    for module in model.modules():
        if module is not model and callable(getattr(module, "reset_parameters", None)):
            with full_parameters(module):
                module.reset_parameters()


@contextlib.contextmanager
def full_parameters(module: nn.Module) -> Iterator[None]:
    """Inside, ``module``'s own sharded (``DTensor``, as after FSDP's ``fully_shard``) parameters are full local
    tensors of their global shape; on exit each rank keeps its shard of them. So every rank initialises the whole
    tensor with the same random numbers as an unsharded model (all ranks must be seeded alike). A no-op for plain
    parameters."""
    sharded = {name: p for name, p in module.named_parameters(recurse=False) if is_sharded(p)}
    for name, p in sharded.items():
        full = torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device)
        module._parameters[name] = nn.Parameter(full, requires_grad=p.requires_grad)
    try:
        yield
    finally:
        for name, p in sharded.items():
            full = module._parameters[name].detach()
            with torch.no_grad():
                p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))
            module._parameters[name] = p


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter sharded by FSDP2)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def resolve_encoding(
    encoding: str | PositionEncoding,
    *,
    head_dim: int,
    num_axes: int,
    options: dict[str, object] | None,
    **sizes: object,
) -> PositionEncoding:
    """Build ``encoding`` from a factory spec (``liere.build(spec, head_dim=, num_axes=, **sizes, **options)``),
    or check that a ready ``PositionEncoding`` fits the model's ``head_dim`` and ``num_axes``."""
    if isinstance(encoding, PositionEncoding):
        if options:
            raise ValueError("encoding_options only apply to a spec string, not to a built PositionEncoding")
        if (encoding.head_dim, encoding.num_axes) != (head_dim, num_axes):
            raise ValueError(
                f"encoding was built for head_dim={encoding.head_dim}, num_axes={encoding.num_axes}; "
                f"the model needs head_dim={head_dim}, num_axes={num_axes}"
            )
        return encoding
    if not isinstance(encoding, str):
        raise TypeError(f"encoding must be a spec string such as 'liere8' or a PositionEncoding, got {encoding!r}")
    return build(encoding, head_dim=head_dim, num_axes=num_axes, **sizes, **(options or {}))
