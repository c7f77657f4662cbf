"""``Rotations``: a batch of block-diagonal orthogonal matrices, the one object every encoding returns."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from liere.linalg import block_diag
from liere.precision import apply_dtype


class Rotations:
    """Block-diagonal orthogonal matrices ``R(p)`` for every layer, sample, head and position.

    Four storage kinds (``kind``), each with its constructor, all with leading layout ``(depth, S, H, n)``, where
    ``S`` is 1 when coordinates are shared by the batch (else the batch size) and ``H`` is 1 when heads share
    rotations:

    - ``"pairs"`` (block size 2, ``from_angles``): ``cos``, ``sin`` of shape ``(depth, S, H, n, rot_dim // 2)``,
      applied elementwise to the interleaved feature pairs ``(2j, 2j+1)`` exactly as rotary-embedding-torch does;
    - ``"pairs_in_basis"`` (``from_angles(..., basis=Q)``): the same ``cos``, ``sin`` plus an orthogonal ``basis``
      ``Q`` of shape ``(depth, S, H, rot_dim, rot_dim)`` shared by all positions: ``R(p) = Q rot(p) Q^T``, applied
      as two small matmuls around the elementwise rotation (commuting encodings: STRING, RoPE in a learned basis);
    - ``"blocks"`` (block size ``b >= 3``, ``from_blocks``): ``blocks`` of shape
      ``(depth, S, H, n, rot_dim // b, b, b)``, applied with one batched matmul in which the batch dimension rides
      along the matrix columns;
    - ``"identity"`` (additive or no encoding, ``identity``): nothing stored.

    Features ``[rot_dim, head_dim)`` pass through unchanged. Use ``rot[i]`` for layer ``i``'s rotations
    (or ``rot.for_layer(i)``, which also accepts depth-1 rotations shared by all layers). Precision follows
    ``liere.precision``.
    """

    def __init__(
        self,
        head_dim: int,
        *,
        cos: Tensor | None = None,
        sin: Tensor | None = None,
        blocks: Tensor | None = None,
        basis: Tensor | None = None,
        shape: tuple[int, int, int, int] | None = None,
    ) -> None:
        if blocks is not None:
            if cos is not None or sin is not None:
                raise ValueError("Rotations: give either cos/sin or blocks, not both")
            if blocks.dim() != 7 or blocks.shape[-1] != blocks.shape[-2]:
                raise ValueError(f"blocks must be (depth, S, H, n, nb, b, b), got {tuple(blocks.shape)}")
            rot_dim, lead = blocks.shape[-3] * blocks.shape[-1], tuple(blocks.shape[:4])
        elif cos is not None and sin is not None:
            if cos.shape != sin.shape or cos.dim() != 5:
                raise ValueError(
                    f"cos and sin must both be (depth, S, H, n, pairs), got {tuple(cos.shape)} and {tuple(sin.shape)}"
                )
            rot_dim, lead = 2 * cos.shape[-1], tuple(cos.shape[:4])
        elif cos is None and sin is None and shape is not None:
            rot_dim, lead = 0, tuple(shape)
        else:
            raise ValueError("Rotations: give cos and sin, or blocks, or (for the identity) shape")
        if basis is not None and (cos is None or basis.dim() != 5 or basis.shape[-2:] != (rot_dim, rot_dim)):
            raise ValueError(f"basis must be (depth, S, H, {rot_dim}, {rot_dim}) beside cos/sin, got {basis.shape}")
        if rot_dim > head_dim:
            raise ValueError(f"rotations cover {rot_dim} features but head_dim={head_dim}")
        self.head_dim = head_dim
        self.rot_dim = rot_dim
        self.cos, self.sin, self.blocks, self.basis = cos, sin, blocks, basis
        self._lead: tuple[int, int, int, int] = lead  # (depth, S, H, n)
        kind = "pairs_in_basis" if basis is not None else "pairs" if cos is not None else "identity"
        self.kind = "blocks" if blocks is not None else kind  # "identity" | "pairs" | "pairs_in_basis" | "blocks"

    # ----------------------------------------------------------------- construction
    @classmethod
    def identity(cls, head_dim: int, num_positions: int, depth: int = 1) -> Rotations:
        """Rotations that leave every vector unchanged (the result of additive or no encodings)."""
        return cls(head_dim, shape=(depth, 1, 1, num_positions))

    @classmethod
    def from_angles(cls, angles: Tensor, head_dim: int, basis: Tensor | None = None) -> Rotations:
        """Pair rotations by ``angles`` ``(depth, S, H, n, pairs)`` of the feature pairs ``(2j, 2j+1)``; with an
        orthogonal ``basis`` ``Q`` ``(depth, H, 2 pairs, 2 pairs)`` (shared by samples and positions) the rotations
        ``Q rot(angles) Q^T`` kept factored: nothing ``r x r`` is built per position."""
        return cls(head_dim, cos=angles.cos(), sin=angles.sin(), basis=None if basis is None else basis.unsqueeze(1))

    @classmethod
    def from_blocks(cls, blocks: Tensor, head_dim: int) -> Rotations:
        """Block rotations from orthogonal ``blocks`` ``(depth, S, H, n, rot_dim // b, b, b)``."""
        return cls(head_dim, blocks=blocks)

    def _replace(self, **tensors: Tensor) -> Rotations:
        """Same kind (and class) of rotations with new stored tensors (not for the identity)."""
        if self.blocks is not None:
            return type(self)(self.head_dim, blocks=tensors["blocks"])
        return type(self)(self.head_dim, cos=tensors["cos"], sin=tensors["sin"], basis=tensors.get("basis"))

    def _map(self, fn: Any) -> Rotations:
        """Apply ``fn`` to every stored tensor (same shape kind out)."""
        if self.blocks is not None:
            return self._replace(blocks=fn(self.blocks))
        if self.cos is not None:
            basis = None if self.basis is None else fn(self.basis)
            return self._replace(cos=fn(self.cos), sin=fn(self.sin), basis=basis)
        return self

    # ----------------------------------------------------------------- properties
    @property
    def depth(self) -> int:
        return self._lead[0]

    @property
    def num_positions(self) -> int:
        return self._lead[3]

    @property
    def block_size(self) -> int:
        """2 for pairs, ``b`` for blocks, ``rot_dim`` for pairs in a (dense) basis, 0 for the identity."""
        if self.blocks is not None:
            return self.blocks.shape[-1]
        if self.basis is not None:
            return self.rot_dim
        return 2 if self.cos is not None else 0

    @property
    def is_identity(self) -> bool:
        return self.rot_dim == 0

    @property
    def dtype(self) -> torch.dtype | None:
        stored = self.blocks if self.blocks is not None else self.cos
        return None if stored is None else stored.dtype

    def __len__(self) -> int:
        return self.depth

    def __repr__(self) -> str:
        d, s, h, n = self._lead
        return (
            f"Rotations(depth={d}, samples={s}, heads={h}, positions={n}, head_dim={self.head_dim}, "
            f"rot_dim={self.rot_dim}, block_size={self.block_size}, dtype={self.dtype})"
        )

    # ----------------------------------------------------------------- indexing and conversion
    def __getitem__(self, layer: int) -> Rotations:
        """Layer ``layer``'s rotations, as depth-1 ``Rotations``."""
        if not isinstance(layer, int):
            raise TypeError(f"Rotations index must be an int layer, got {type(layer).__name__}")
        if not -self.depth <= layer < self.depth:
            raise IndexError(f"layer {layer} out of range for Rotations of depth {self.depth}")
        layer %= self.depth
        if self.is_identity:
            return Rotations(self.head_dim, shape=(1, *self._lead[1:]))
        return self._map(lambda t: t[layer : layer + 1])

    def for_layer(self, layer: int) -> Rotations:
        """Rotations for layer ``layer``: ``self`` when depth is 1 (shared by all layers), else ``self[layer]``."""
        return self if self.depth == 1 else self[layer]

    def transpose(self) -> Rotations:
        """The inverse rotations ``R(p)^T``."""
        if self.blocks is not None:
            return self._replace(blocks=self.blocks.transpose(-1, -2))
        if self.cos is not None:
            return self._replace(cos=self.cos, sin=-self.sin, basis=self.basis)
        return self

    def to(self, *args: Any, **kwargs: Any) -> Rotations:
        """Move/cast the stored tensors, with ``torch.Tensor.to``'s arguments."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def with_prefix(self, num_prefix_tokens: int) -> Rotations:
        """Prepend ``num_prefix_tokens`` positions whose rotation is the identity (CLS, register tokens).

        This is the one way to keep prefix tokens unrotated: every encoding's ``forward(coords,
        num_prefix_tokens=k)`` calls it, so ``apply`` then expects ``k + n`` tokens, the first ``k`` untouched.
        """
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        if num_prefix_tokens == 0:
            return self
        if self.is_identity:
            d, s, h, n = self._lead
            return Rotations(self.head_dim, shape=(d, s, h, n + num_prefix_tokens))

        def pad(t: Tensor, fill: Tensor) -> Tensor:
            shape = list(t.shape)
            shape[3] = num_prefix_tokens
            return torch.cat([fill.to(t).expand(shape), t], dim=3)

        one, zero = torch.ones(()), torch.zeros(())
        if self.blocks is not None:
            return self._replace(blocks=pad(self.blocks, torch.eye(self.block_size)))
        return self._replace(cos=pad(self.cos, one), sin=pad(self.sin, zero), basis=self.basis)

    def take_positions(self, index: slice | Tensor) -> Rotations:
        """The rotations of positions ``index`` of shared rotations (``S = 1``): a ``slice``, integer positions ``(n,)``
        (shared) or ``(batch, n)`` (per sample). Position-independent parts (a basis) are kept."""

        def take(t: Tensor) -> Tensor:  # (depth, 1, H, L, ...) -> (depth, 1 or batch, H, n, ...)
            if isinstance(index, slice):
                return t[:, :, :, index]
            if index.dim() == 1:
                return t.index_select(3, index)
            return t[:, 0][:, :, index].movedim(2, 1)

        if self.is_identity:
            count = len(range(*index.indices(self.num_positions))) if isinstance(index, slice) else index.shape[-1]
            return Rotations.identity(self.head_dim, count, self.depth)
        if self.blocks is not None:
            return Rotations(self.head_dim, blocks=take(self.blocks))
        return Rotations(self.head_dim, cos=take(self.cos), sin=take(self.sin), basis=self.basis)

    def cat_positions(self, other: Rotations) -> Rotations:
        """These rotations' positions followed by ``other``'s (same layout; a basis is shared)."""
        if self.is_identity:
            return Rotations.identity(self.head_dim, self.num_positions + other.num_positions, self.depth)
        if self.blocks is not None:
            return Rotations(self.head_dim, blocks=torch.cat([self.blocks, other.blocks], dim=3))
        cos, sin = (torch.cat([a, b], dim=3) for a, b in ((self.cos, other.cos), (self.sin, other.sin)))
        return Rotations(self.head_dim, cos=cos, sin=sin, basis=self.basis)

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by field name (``cos``, ``sin``, ``blocks``, ``basis``; none for the identity)."""
        return {name: t for name in ("cos", "sin", "blocks", "basis") if (t := getattr(self, name)) is not None}

    def to_dense(self) -> Tensor:
        """Full matrices, shape ``(depth, S, H, n, head_dim, head_dim)`` (for tests and plots)."""
        if self.blocks is not None:
            blocks = self.blocks
        elif self.cos is not None:
            blocks = torch.stack([self.cos, -self.sin, self.sin, self.cos], dim=-1).unflatten(-1, (2, 2))
        else:
            eye = torch.eye(self.head_dim)
            return eye.expand(*self._lead, self.head_dim, self.head_dim).clone()
        if self.basis is not None:  # one dense block Q rot(p) Q^T
            Q = self.basis.unsqueeze(3)  # (depth, S, H, 1, r, r)
            blocks = (Q @ block_diag(blocks, self.rot_dim, fill_identity=True) @ Q.transpose(-1, -2)).unsqueeze(-3)
        return block_diag(blocks, self.head_dim, fill_identity=True)

    def node(self, tracer: Any) -> torch.fx.Proxy:
        """Under ``torch.fx`` symbolic tracing: a node yielding these rotations at run time, rebuilt from their tensors
        (constants of the graph). Encodings' own rotations are traced as calls instead (``liere.fx``)."""
        stored = self.tensors() or {"shape": self._lead}
        return tracer.create_proxy("call_function", rotations_from, (self.head_dim, stored), {})

    # ----------------------------------------------------------------- application
    def apply(self, x: Tensor) -> Tensor:
        """Rotate ``x`` of shape ``(batch, heads, n, head_dim)``: ``out[b, h, i] = R(p_i) x[b, h, i]``.

        Computed in the promoted dtype of ``x`` and the rotations (fp32 by default), returned in ``x``'s dtype.
        Under ``torch.fx`` symbolic tracing (``x`` a ``Proxy``) this call is recorded as one node (``liere.fx``).
        """
        if isinstance(x, torch.fx.Proxy):
            return x if self.is_identity else self.node(x.tracer).apply(x)
        self.check_input(x)
        if self.is_identity:
            return x
        if self.depth != 1:
            raise ValueError(
                f"these Rotations hold {self.depth} layers; pick one with rot[layer] (or rot.for_layer(layer))"
            )
        rot, passthrough = x[..., : self.rot_dim], x[..., self.rot_dim :]
        out = self._apply_blocks(rot) if self.blocks is not None else self._apply_pairs(rot)
        if passthrough.shape[-1] == 0:
            return out.to(x.dtype)
        full = torch.empty_like(x)  # not torch.cat: CPU autocast rejects cat of fp16 tensors
        full[..., : self.rot_dim] = out
        full[..., self.rot_dim :] = passthrough
        return full

    def check_input(self, x: Tensor) -> None:
        """Raise unless ``x`` is ``(batch, heads, n, head_dim)`` fitting these rotations."""
        _, s, h, n = self._lead
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (batch, heads, n, head_dim), got {shape}")
        batch, heads, tokens, width = x.shape
        if width != self.head_dim:
            raise ValueError(f"x has head_dim {width} but the rotations were built for head_dim={self.head_dim}")
        if tokens != n:
            raise ValueError(f"x has {tokens} tokens but the rotations hold {n} positions (prefix tokens included)")
        if h not in (1, heads):
            raise ValueError(f"x has {heads} heads but the rotations hold {h} per-head rotations")
        if s not in (1, batch):
            raise ValueError(f"x has batch {batch} but the rotations hold per-sample coordinates for {s} samples")

    def _apply_pairs(self, x: Tensor) -> Tensor:
        cos, sin = self.cos.squeeze(0), self.sin.squeeze(0)  # (S, H, n, pairs): broadcast over (batch, heads, n, pairs)
        if self.basis is not None:  # rows: x Q = (Q^T x)^T, then rotate pairs, then back with Q^T
            Q = self.basis.squeeze(0)  # (S, H, r, r)
            Q = Q.to(apply_dtype(x.dtype, Q.dtype, x.device.type, matmul=False))
            x = x.to(Q.dtype) @ Q
        x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
        return out if self.basis is None else out @ Q.transpose(-1, -2)

    def _apply_blocks(self, x: Tensor) -> Tensor:
        mats = self.blocks.squeeze(0)  # (S, H, n, nb, b, b); squeeze, not [0]: its backward is a view
        _, s, h, _ = self._lead
        b = self.block_size
        xb = x.unflatten(-1, (-1, b))  # (batch, heads, n, nb, b)
        dtype = apply_dtype(x.dtype, mats.dtype, x.device.type, matmul=True)  # what einsum would use
        grad = torch.is_grad_enabled() and (mats.requires_grad or x.requires_grad)
        if not grad and x.shape[2] == 1 and x.shape[0] <= 2 and s == 1 and h == x.shape[1]:  # a decoding step:
            # one position of q and k, no backward: one plain bmm with the samples along the matrix columns, less
            # overhead than einsum (slower for many positions); in ``dtype`` already, autocast leaves it alone
            return (mats[0].to(dtype) @ xb.movedim(0, -1).to(dtype)).movedim(-1, 0).flatten(-2)
        # Squeeze the shared sample/head dims so that einsum batches over (heads, n, nb) and lets the
        # batch ride along the matrix columns: the rotations are never copied per sample.
        mat_idx = ("z" if s != 1 else "") + ("h" if h != 1 else "") + "nicd"  # s = 0: an empty batch
        mats = mats.reshape(*([s] if s != 1 else []), *([h] if h != 1 else []), *mats.shape[2:])
        rotate = _BlockRotate if torch.compiler.is_compiling() else _BlockRotateWithJvp
        return rotate.apply(mats.to(dtype), xb.to(dtype), mat_idx).flatten(-2)


class _BlockRotate(torch.autograd.Function):
    """``out[z, h, n, i] = mats[.., n, i] @ x[z, h, n, i]`` that saves ``x`` itself for the backward.

    Plain einsum saves the permuted copy of ``x`` it hands to bmm: one more q-sized and k-sized tensor per
    layer than RoPE keeps. ``x`` (a view of the qkv
    projection, which attention keeps anyway) costs nothing extra. Runs in the dtype it is given. The backward
    is made of differentiable einsums (double backward), the forward has a generated ``vmap`` rule
    (``torch.func`` transforms); ``_BlockRotateWithJvp`` adds forward-mode AD.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(mats: Tensor, x: Tensor, mat_idx: str) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return torch.einsum(f"{mat_idx},zhnid->zhnic", mats, x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, str], output: Tensor) -> None:
        mats, x, ctx.mat_idx = inputs
        ctx.save_for_backward(mats, x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        mats, x = ctx.saved_tensors
        grad = grad.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            grad_mats = torch.einsum(f"zhnic,zhnid->{ctx.mat_idx}", grad, x) if ctx.needs_input_grad[0] else None
            grad_x = torch.einsum(f"{ctx.mat_idx},zhnic->zhnid", mats, grad) if ctx.needs_input_grad[1] else None
        return grad_mats, grad_x, None


class _BlockRotateWithJvp(_BlockRotate):
    """``_BlockRotate`` with forward-mode AD (``jvp``); eager only: Dynamo cannot trace a custom ``jvp``."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, str], output: Tensor) -> None:
        _BlockRotate.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:2])

    @staticmethod
    def jvp(ctx: Any, mats_tangent: Tensor | None, x_tangent: Tensor | None, _: None) -> Tensor:
        """Forward-mode AD of the bilinear product: ``dmats @ x + mats @ dx``."""
        mats, x = ctx.saved_tensors
        terms = [(m, v) for m, v in ((mats_tangent, x), (mats, x_tangent)) if m is not None and v is not None]
        with torch.autocast(x.device.type, enabled=False):
            return sum(torch.einsum(f"{ctx.mat_idx},zhnid->zhnic", m, v) for m, v in terms)


def rotations_from(head_dim: int, tensors: dict[str, Any]) -> Rotations:
    """``Rotations(head_dim, **tensors)``: the run time of ``Rotations.node``."""
    return Rotations(head_dim, **tensors)
