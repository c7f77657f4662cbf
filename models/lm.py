"""Decoder-only character language model with any 1D position encoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import liere
from liere import Grid, PositionEncoding, no_weight_decay_names
from liere.encoding import check_positive_int
from models.blocks import (
    KVCache,
    Transformer,
    check_heads,
    check_weight_init,
    init_weights,
    reset_submodules,
    resolve_encoding,
)

# the 1D rotary encodings at head_dim 16 (LieRE with 4x4 blocks and dense): every one decodes with a KVCache
ROTARY_1D = (
    "rope",
    "rope-mixed",
    "liere4",
    "liere16",
    "rope-basis",
    "string-cayley",
    "string-circulant",
    "comrope-ap4",
    "comrope-ld4",
)
LM_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(dim=128, depth=4, heads=4, context=256),
    "small": dict(dim=256, depth=6, heads=8, context=512),
    "char": dict(dim=512, depth=6, heads=8, context=1024),  # the benchmark char-LM
}


class CharLM(nn.Module):
    """Causal transformer LM over token ids; positions are token indices ``Grid((T,))`` (0, 1, ..., T-1).

    ``context`` is the training length: it sizes the ``"abs"`` table and is the default of ``size``'s preset.
    Sequences longer than ``context`` are accepted (length extrapolation): rotary encodings just see larger
    coordinates, ``"abs"`` (``LearnedAbsolute``) clamps positions past the table to its last entry, and
    ``"sincos"`` evaluates its formula at the new positions. The output head is tied to the token embedding
    (``tie_embeddings=True``, default) or a separate linear layer.
    ``weight_init`` initialises the linear layers (``models.blocks.init_weights``): ``"trunc_normal"`` or
    ``"xavier"``.
    """

    def __init__(
        self,
        vocab_size: int,
        context: int | None = None,
        encoding: str | PositionEncoding = "rope",
        size: str = "char",
        dim: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        encoding_options: dict[str, object] | None = None,
        weight_init: str = "trunc_normal",
    ) -> None:
        super().__init__()
        if size not in LM_SIZES:
            raise ValueError(f"size must be one of {sorted(LM_SIZES)}, got {size!r}")
        overrides = dict(context=context, dim=dim, depth=depth, heads=heads)
        config = LM_SIZES[size] | {k: v for k, v in overrides.items() if v is not None}
        self.vocab_size = check_positive_int(vocab_size, "vocab_size")
        self.context = check_positive_int(config["context"], "context")
        dim, depth, heads = config["dim"], config["depth"], config["heads"]

        self.token_embed = nn.Embedding(vocab_size, dim)
        self.encoding = resolve_encoding(
            encoding,
            head_dim=check_heads(dim, heads),
            num_axes=1,
            options=encoding_options,
            num_heads=heads,
            depth=depth,
            dim=dim,
            grid_shape=(self.context,),
        )
        self.drop = nn.Dropout(dropout)
        self.transformer = Transformer(dim, depth, heads, mlp_ratio, dropout, causal=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.weight_init, self.tie_embeddings = check_weight_init(weight_init), bool(tie_embeddings)
        init_weights(self, weight_init, [(self.token_embed, "weight")])
        if tie_embeddings:
            self.head.weight = self.token_embed.weight

    def init_weights(self) -> None:
        """Initialise every parameter and buffer in place, on its device, to the values construction gives under the
        same seed (``torch.manual_seed`` first): for a model built under ``torch.device("meta")`` and then
        ``to_empty``'d, which also unties the output head (tied again here). A ready ``PositionEncoding`` passed in
        is reset too."""
        if self.tie_embeddings:  # construction draws the head's own weight before tying it
            self.head.weight = nn.Parameter(torch.empty_like(self.token_embed.weight))
        reset_submodules(self)
        init_weights(self, self.weight_init, [(self.token_embed, "weight")])
        if self.tie_embeddings:
            self.head.weight = self.token_embed.weight

    def freeze_rotations(self, length: int | None = None) -> CharLM:
        """Freeze the rotations of positions ``0 .. length-1`` (default ``context``) as a table (``liere.freeze``):
        every forward and cached decoding step inside it reads rows of the table."""
        length = self.context if length is None else check_positive_int(length, "length")
        return liere.freeze(self, Grid((length,)))

    def forward(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """Logits ``(B, T, vocab_size)`` for token ids ``idx`` ``(B, T)``; position t sees tokens 0..t.

        With a ``KVCache`` the tokens continue the cached sequence: they sit at positions ``cache.length``
        onwards, attend to the cached keys and values, and are appended to the cache.
        """
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.is_floating_point():
            shape = tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__
            raise ValueError(f"idx must be an integer tensor (batch, T), got {shape}")
        grid = Grid((idx.shape[1],), offset=float(cache.length) if cache is not None else 0.0)
        x = self.encoding.add_to_tokens(self.token_embed(idx), grid)
        x = self.transformer(self.drop(x), self.encoding(grid), cache)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue prompts ``idx`` ``(B, T)`` by ``max_new_tokens`` sampled tokens; returns ``(B, T + new)``.

        ``temperature=0`` decodes greedily; ``top_k`` samples among the ``k`` likeliest tokens. With
        ``use_cache`` (default) the prompt is encoded once into a ``KVCache`` and each step feeds only the
        new token (one rotation at its position); ``use_cache=False`` recomputes the whole sequence per step.
        """
        check_positive_int(max_new_tokens, "max_new_tokens")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        cache = KVCache() if use_cache else None
        out, step_input = idx, idx
        for _ in range(max_new_tokens):
            logits = self(step_input, cache)[:, -1].float()
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if temperature == 0:
                token = logits.argmax(-1, keepdim=True)
            else:
                token = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)
            out = torch.cat([out, token], dim=1)
            step_input = token if use_cache else out
        return out

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy of ``forward(idx)`` against ``targets`` ``(B, T)``."""
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def no_weight_decay(self) -> set[str]:
        """Full names of the encoding's parameters (to exclude from weight decay)."""
        return no_weight_decay_names(self)
