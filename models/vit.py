"""Vision transformer for 2D images ``(B, C, H, W)`` and 3D clips/volumes ``(B, C, T, H, W)`` with any encoding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

import liere
from liere import Grid, PositionEncoding, no_weight_decay_names
from liere.fx import is_symbolic_tracing
from models.blocks import Transformer, check_heads, check_weight_init, init_weights, reset_submodules, resolve_encoding

VIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(dim=192, depth=12, heads=3),
    "small": dict(dim=384, depth=12, heads=6),
    "base": dict(dim=768, depth=12, heads=12),  # the LieRE paper's ViT-B
}
POOLS = ("cls", "mean")
COORD_SCALES = ("index", "stretch")


def _as_tuple(value: int | Sequence[int], length: int, name: str) -> tuple[int, ...]:
    values = (value,) * length if isinstance(value, int) else tuple(value)
    if len(values) != length or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"{name} must be a positive int or {length} positive ints, got {value!r}")
    return values


class ViT(nn.Module):
    """ViT classifier whose position encoding is any ``liere`` factory spec (or a built ``PositionEncoding``).

    ``image_shape`` is ``(C, H, W)`` (2D, patches ``(ph, pw)``) or ``(C, T, H, W)`` (3D, tubelets
    ``(pt, ph, pw)``); it fixes the channel count and the training grid. Inputs of other spatial sizes
    (divisible by the patch) are accepted: the grid is read off the input and the coordinates recomputed.
    ``coord_scale`` says how a grid other than the training grid is placed:

    - ``"index"``: patch indices (``grid_coords`` default), so a larger image covers a larger range;
    - ``"stretch"``: the new grid spans the training range, spacing ``(train_n - 1) / (test_n - 1)`` per axis.

    ``unit_coords=True`` divides every coordinate by ``train_n - 1`` per axis, so the training grid spans
    ``[0, 1]`` (the LieRE paper's convention, meant for ``init="uniform"``); ``coord_scale`` applies on top.

    ``pool="cls"`` classifies from a CLS token, ``"mean"`` from the mean patch token. CLS and the
    ``num_registers`` register tokens are prefix tokens: unrotated and without absolute embedding.
    ``size`` picks dim/depth/heads from ``VIT_SIZES``; explicit ``dim``/``depth``/``heads`` override it.
    ``weight_init`` initialises the linear layers (``models.blocks.init_weights``): timm's ``"trunc_normal"``
    or ``"xavier"``, which the ``cpu`` preset uses because narrow models escape their first plateau sooner.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        patch_size: int | Sequence[int],
        encoding: str | PositionEncoding = "liere8",
        size: str = "tiny",
        dim: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        pool: str = "cls",
        num_registers: int = 0,
        dropout: float = 0.0,
        coord_scale: str = "index",
        unit_coords: bool = False,
        encoding_options: dict[str, object] | None = None,
        weight_init: str = "trunc_normal",
    ) -> None:
        super().__init__()
        if size not in VIT_SIZES:
            raise ValueError(f"size must be one of {sorted(VIT_SIZES)}, got {size!r}")
        shape = tuple(image_shape) if isinstance(image_shape, Sequence) else ()
        if len(shape) not in (3, 4):
            raise ValueError(f"image_shape must be (C, H, W) or (C, T, H, W), got {image_shape!r}")
        self.in_channels, *spatial = _as_tuple(shape, len(shape), "image_shape")
        self.num_axes = len(spatial)
        self.patch_size = _as_tuple(patch_size, self.num_axes, "patch_size")
        self.train_grid = self._grid(tuple(spatial), "image_shape")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if coord_scale not in COORD_SCALES:
            raise ValueError(f"coord_scale must be one of {COORD_SCALES}, got {coord_scale!r}")
        if not isinstance(num_registers, int) or num_registers < 0:
            raise ValueError(f"num_registers must be an int >= 0, got {num_registers!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        config = VIT_SIZES[size] | {k: v for k, v in dict(dim=dim, depth=depth, heads=heads).items() if v is not None}
        self.dim, depth, heads = config["dim"], config["depth"], config["heads"]
        self.pool, self.coord_scale, self.unit_coords = pool, coord_scale, bool(unit_coords)
        self.num_prefix_tokens = int(pool == "cls") + num_registers

        conv = nn.Conv2d if self.num_axes == 2 else nn.Conv3d
        self.patch_embed = conv(self.in_channels, self.dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.dim)) if pool == "cls" else None
        self.registers = nn.Parameter(torch.zeros(1, num_registers, self.dim)) if num_registers else None
        self.encoding = resolve_encoding(
            encoding,
            head_dim=check_heads(self.dim, heads),
            num_axes=self.num_axes,
            options=encoding_options,
            num_heads=heads,
            depth=depth,
            dim=self.dim,
            grid_shape=self.train_grid,
        )
        self.transformer = Transformer(self.dim, depth, heads, mlp_ratio, dropout)
        self.norm = nn.LayerNorm(self.dim)
        self.head = nn.Linear(self.dim, num_classes)
        self.weight_init = check_weight_init(weight_init)
        init_weights(self, weight_init, self._normal_init())

    def _normal_init(self) -> list[tuple[nn.Module, str]]:
        """The parameters initialised ``trunc_normal(std=0.02)`` after the linear layers: the prefix tokens."""
        return [(self, name) for name in ("cls_token", "registers") if getattr(self, name) is not None]

    def init_weights(self) -> None:
        """Initialise every parameter and buffer in place, on its device, to the values construction gives under the
        same seed (``torch.manual_seed`` first): for a model built under ``torch.device("meta")`` and then
        ``to_empty``'d (also after FSDP's ``fully_shard``). A ready ``PositionEncoding`` passed in is reset too."""
        reset_submodules(self)
        init_weights(self, self.weight_init, self._normal_init())

    def freeze_rotations(self) -> ViT:
        """Freeze the encoding's rotations at the image size (``liere.freeze``): for compiled or exported serving."""
        return liere.freeze(self, self.grid(self.train_grid))

    def _grid(self, spatial: tuple[int, ...], name: str) -> tuple[int, ...]:
        """Patch grid of a spatial size, checking each axis is divisible by the patch size."""
        if any(s % p for s, p in zip(spatial, self.patch_size, strict=True)):
            raise ValueError(f"{name}: spatial size {spatial} must be divisible by the patch size {self.patch_size}")
        return tuple(s // p for s, p in zip(spatial, self.patch_size, strict=True))

    def grid(self, shape: Sequence[int]) -> Grid:
        """The ``Grid`` of a patch grid of ``shape``, placed according to ``coord_scale`` and ``unit_coords``."""
        if self.coord_scale == "stretch":
            spacing = [(t - 1) / (g - 1) if g > 1 else 1.0 for t, g in zip(self.train_grid, shape, strict=True)]
        else:
            spacing = [1.0] * self.num_axes
        if self.unit_coords:
            spacing = [s / (t - 1) if t > 1 else s for s, t in zip(spacing, self.train_grid, strict=True)]
        return Grid(tuple(shape), tuple(spacing))

    def coords(self, grid: Sequence[int], device: torch.device | str | None = None) -> Tensor:
        """Patch coordinates ``(prod(grid), num_axes)`` for a patch grid, placed according to ``coord_scale``."""
        return self.grid(grid).coords(device)

    def forward_features(self, images: Tensor) -> Tensor:
        """All tokens after the final norm, ``(B, num_prefix_tokens + num_patches, dim)``."""
        tracing = is_symbolic_tracing()  # torch.fx: no sizes to check or read; the graph has the training grid
        if not tracing:
            self._check_images(images)
        patches = self.patch_embed(images)  # (B, dim, *grid)
        x = patches.flatten(2).transpose(1, 2)  # (B, n, dim) in row-major patch order, as grid_coords
        grid = self.grid(self.train_grid if tracing else [int(s) for s in patches.shape[2:]])  # ints under jit.trace
        x = self.encoding.add_to_tokens(x, grid)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.registers) if t is not None]
        x = torch.cat([*prefix, x], dim=1)
        rot = self.encoding(grid, num_prefix_tokens=self.num_prefix_tokens)
        return self.norm(self.transformer(x, rot))

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)`` for images ``(B, C, H, W)`` or clips ``(B, C, T, H, W)``."""
        x = self.forward_features(images)
        pooled = x[:, 0] if self.pool == "cls" else x[:, self.num_prefix_tokens :].mean(dim=1)
        return self.head(pooled)

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        layout = "(B, C, H, W)" if self.num_axes == 2 else "(B, C, T, H, W)"
        if images.dim() != self.num_axes + 2:
            raise ValueError(f"images must be {layout}, got shape {tuple(images.shape)}")
        if images.shape[1] != self.in_channels:
            raise ValueError(f"images have {images.shape[1]} channels, the model expects {self.in_channels}")
        self._grid(tuple(images.shape[2:]), "images")

    def no_weight_decay(self) -> set[str]:
        """Full names of parameters to exclude from weight decay: the encoding's and the prefix tokens."""
        prefix = {name for name in ("cls_token", "registers") if getattr(self, name) is not None}
        return no_weight_decay_names(self) | prefix
