"""Load the official LieRE checkpoints (StanfordMIMI/LieRE ``RoPEViT``) into ``models.ViT`` + a ``LieRE`` encoding.

The official layout (read from its ``state_dict``): ``to_patch_embedding.1`` (a ``Linear`` over patches flattened
as ``(p1 p2 c)``), ``cls_token``, ``pos_embedding`` (zeros, unused by LieRE runs),
``transformer.layers.{i}.0.norm`` / ``.0.fn.to_qkv`` (no bias) / ``.0.fn.to_out.0`` (attention, pre-norm),
``transformer.layers.{i}.1.norm`` / ``.1.fn.net.0`` / ``.1.fn.net.3`` (MLP), ``mlp_head.0`` (LayerNorm) and
``mlp_head.1`` (classifier) on the CLS token, and ``position_encoder.generator_raw_params`` of shape
``(axes, layers, blocks, b, b)`` where ``blocks`` is ``head_dim / b`` (shared by heads) or ``heads * head_dim / b``
(per head, head-major) and ``layers`` is 1 or ``depth``. Its generator is ``A = U - U^T`` with ``U`` the strict
upper triangle of the raw parameters, so liere's lower-triangle parameter ``A[r, c]`` (``r > c``) is
``-raw[c, r]``. Patch coordinates are ``linspace(0, 1, n)`` per axis at the training size (``unit_coords=True``),
the CLS token unrotated. The official forward hands layer 0's generators to every layer (it overwrites the
per-layer tensor with layer 0's slice in its first block): ``layers="first"`` (default) reproduces that,
``layers="each"`` gives every layer its own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from liere.lie import LieRE
from models.vit import ViT

LAYER_MODES = ("first", "each")
DIM_HEAD = 64  # the official FlexibleAttention supports only 64


def read_state_dict(source: str | Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict from a mapping, a local file, or ``hf:OWNER/REPO/FILE`` (Hugging Face Hub; one line offline).

    Lightning checkpoints (``{"state_dict": {"model.…": …}}``) are unwrapped."""
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = str(source)
        if path.startswith("hf:"):
            path = hub_file(path[3:])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"official LieRE checkpoint: no file {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = dict(state["state_dict"])
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items()}
    return state


def hub_file(spec: str) -> str:
    """Download ``OWNER/REPO/FILE`` from the Hugging Face Hub; a one-line ``RuntimeError`` when it cannot."""
    parts = spec.split("/", 2)
    if len(parts) != 3:
        raise ValueError(f"hub source must be hf:OWNER/REPO/FILE, got hf:{spec}")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise RuntimeError(f"hf:{spec}: HF_HUB_OFFLINE is set; download the file and pass its local path")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(f"{parts[0]}/{parts[1]}", parts[2])
    except Exception as error:  # network or hub errors: one line naming the file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RuntimeError(f"hf:{spec}: could not download ({first})") from None


def official_generators(raw: Tensor, heads: int, depth: int, layers: str) -> Tensor:
    """liere ``generators`` ``(depth', heads', axes, blocks, b (b-1) / 2)`` from the official raw parameters."""
    axes, raw_layers, blocks, b, _ = raw.shape
    head_dim = DIM_HEAD
    if blocks not in (head_dim // b, heads * head_dim // b) or head_dim % b:
        raise ValueError(
            f"position_encoder.generator_raw_params: {blocks} blocks of size {b} fit neither head_dim={head_dim} "
            f"shared by heads nor {heads} heads"
        )
    if raw_layers not in (1, depth):
        raise ValueError(f"position_encoder.generator_raw_params: {raw_layers} layers, expected 1 or depth={depth}")
    rows, cols = torch.tril_indices(b, b, -1)
    params = -raw[..., cols, rows]  # (axes, layers, blocks, m): A[r, c] = -raw[c, r]
    per_head = blocks // (head_dim // b)
    params = params.unflatten(2, (per_head, head_dim // b)).permute(1, 2, 0, 3, 4)  # (layers, heads', axes, nb, m)
    return params[:1] if layers == "first" else params


def load_official_liere(
    source: str | Path | Mapping[str, Tensor],
    *,
    image_size: int | tuple[int, int] | None = None,
    channels: int = 3,
    layers: str = "first",
) -> ViT:
    """``models.ViT`` (eval mode) computing the official LieRE ``RoPEViT`` of ``source`` (see the module docstring).

    Sizes are read off the state dict (square images unless ``image_size`` is given). Every key and shape is
    checked before anything is built: a mismatch names the first key and both shapes.
    """
    if layers not in LAYER_MODES:
        raise ValueError(f"layers must be one of {LAYER_MODES}, got {layers!r}")
    state = read_state_dict(source)
    for key in (
        "cls_token",
        "to_patch_embedding.1.weight",
        "position_encoder.generator_raw_params",
        "mlp_head.1.weight",
    ):
        if key not in state:
            raise ValueError(f"official LieRE checkpoint: missing key {key!r} (is this a LieRE RoPEViT state dict?)")
    dim = state["cls_token"].shape[-1]
    depth = len({k.split(".")[2] for k in state if k.startswith("transformer.layers.")})
    inner = state["transformer.layers.0.0.fn.to_qkv.weight"].shape[0] // 3
    heads = inner // DIM_HEAD
    if inner != dim or inner % DIM_HEAD:
        raise ValueError(f"official LieRE checkpoint: attention width {inner} must equal dim={dim} with heads of 64")
    patch = math.isqrt(state["to_patch_embedding.1.weight"].shape[1] // channels)
    num_patches = state["pos_embedding"].shape[1] - 1 if "pos_embedding" in state else None
    if image_size is None:
        if num_patches is None:
            raise ValueError("official LieRE checkpoint has no pos_embedding: pass image_size")
        side = math.isqrt(num_patches) * patch
        image_size = (side, side)
    image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    mlp_dim, num_classes = state["transformer.layers.0.1.fn.net.0.weight"].shape[0], state["mlp_head.1.weight"].shape[0]
    raw = state["position_encoder.generator_raw_params"]
    axes, b = raw.shape[0], raw.shape[-1]
    expected = official_shapes(dim, depth, inner, mlp_dim, num_classes, channels * patch * patch)
    for key, shape in expected.items():
        got = tuple(state[key].shape) if key in state else None
        if got != shape:
            raise ValueError(f"official LieRE checkpoint: key {key!r} has shape {got}, expected {shape}")
    generators = official_generators(raw, heads, depth, layers)
    encoding = LieRE(
        head_dim=DIM_HEAD,
        num_axes=axes,
        num_heads=generators.shape[1],
        depth=generators.shape[0],
        block_size=b,
        init="normal",
    )
    model = ViT(
        (channels, *image_size),
        num_classes,
        patch,
        encoding=encoding,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_dim / dim,
        unit_coords=True,
    )
    model.load_state_dict(converted_state(state, generators, model, depth, patch, channels))
    return model.eval()


def official_shapes(
    dim: int, depth: int, inner: int, mlp_dim: int, num_classes: int, patch_dim: int
) -> dict[str, tuple[int, ...]]:
    """Every official key (but ``pos_embedding`` and the generators) with its shape."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "to_patch_embedding.1.weight": (dim, patch_dim),
        "to_patch_embedding.1.bias": (dim,),
        "mlp_head.0.weight": (dim,),
        "mlp_head.0.bias": (dim,),
        "mlp_head.1.weight": (num_classes, dim),
        "mlp_head.1.bias": (num_classes,),
    }
    for i in range(depth):
        p = f"transformer.layers.{i}"
        shapes |= {f"{p}.{j}.norm.{w}": (dim,) for j in (0, 1) for w in ("weight", "bias")}
        shapes |= {f"{p}.0.fn.to_qkv.weight": (3 * inner, dim), f"{p}.0.fn.to_out.0.weight": (dim, inner)}
        shapes |= {f"{p}.0.fn.to_out.0.bias": (dim,), f"{p}.1.fn.net.0.weight": (mlp_dim, dim)}
        shapes |= {f"{p}.1.fn.net.0.bias": (mlp_dim,), f"{p}.1.fn.net.3.weight": (dim, mlp_dim)}
        shapes |= {f"{p}.1.fn.net.3.bias": (dim,)}
    return shapes


def converted_state(
    state: dict[str, Tensor], generators: Tensor, model: ViT, depth: int, patch: int, channels: int
) -> dict[str, Tensor]:
    """The official tensors under ``models.ViT``'s keys (qkv bias zero: the official has none)."""
    weight = state["to_patch_embedding.1.weight"]
    out = {
        "cls_token": state["cls_token"],
        "patch_embed.weight": weight.reshape(-1, patch, patch, channels).permute(0, 3, 1, 2),
        "patch_embed.bias": state["to_patch_embedding.1.bias"],
        "encoding.generators": generators,
        "encoding._extra_state": model.state_dict()["encoding._extra_state"],
        "norm.weight": state["mlp_head.0.weight"],
        "norm.bias": state["mlp_head.0.bias"],
        "head.weight": state["mlp_head.1.weight"],
        "head.bias": state["mlp_head.1.bias"],
    }
    for i in range(depth):
        o, n = f"transformer.layers.{i}", f"transformer.blocks.{i}"
        qkv = state[f"{o}.0.fn.to_qkv.weight"]
        out |= {
            f"{n}.norm1.weight": state[f"{o}.0.norm.weight"],
            f"{n}.norm1.bias": state[f"{o}.0.norm.bias"],
            f"{n}.attn.qkv.weight": qkv,
            f"{n}.attn.qkv.bias": qkv.new_zeros(qkv.shape[0]),
            f"{n}.attn.proj.weight": state[f"{o}.0.fn.to_out.0.weight"],
            f"{n}.attn.proj.bias": state[f"{o}.0.fn.to_out.0.bias"],
            f"{n}.norm2.weight": state[f"{o}.1.norm.weight"],
            f"{n}.norm2.bias": state[f"{o}.1.norm.bias"],
            f"{n}.mlp.0.weight": state[f"{o}.1.fn.net.0.weight"],
            f"{n}.mlp.0.bias": state[f"{o}.1.fn.net.0.bias"],
            f"{n}.mlp.3.weight": state[f"{o}.1.fn.net.3.weight"],
            f"{n}.mlp.3.bias": state[f"{o}.1.fn.net.3.bias"],
        }
    return out
