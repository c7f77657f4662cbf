"""The official LieRE checkpoint layout (StanfordMIMI/LieRE ``RoPEViT``) loaded into ``models.ViT``."""

from __future__ import annotations

import pytest
import torch

from models.official_liere import load_official_liere

DIM, DEPTH, HEADS, PATCH, MLP, CLASSES, SIDE = 128, 2, 2, 8, 96, 5, 32


def official_state(b: int, per_layer: bool, per_head: bool) -> dict[str, torch.Tensor]:
    """Random tensors under the official names and shapes (a Lightning checkpoint's ``model.`` prefix)."""
    g = torch.Generator().manual_seed(0)
    n = (SIDE // PATCH) ** 2
    blocks = 64 // b * (HEADS if per_head else 1)
    shapes = {
        "cls_token": (1, 1, DIM),
        "pos_embedding": (1, n + 1, DIM),
        "to_patch_embedding.1.weight": (DIM, 3 * PATCH * PATCH),
        "to_patch_embedding.1.bias": (DIM,),
        "mlp_head.0.weight": (DIM,),
        "mlp_head.0.bias": (DIM,),
        "mlp_head.1.weight": (CLASSES, DIM),
        "mlp_head.1.bias": (CLASSES,),
        "position_encoder.generator_raw_params": (2, DEPTH if per_layer else 1, blocks, b, b),
    }
    for i in range(DEPTH):
        p = f"transformer.layers.{i}"
        shapes |= {f"{p}.0.norm.weight": (DIM,), f"{p}.0.norm.bias": (DIM,), f"{p}.1.norm.weight": (DIM,)}
        shapes |= {f"{p}.1.norm.bias": (DIM,), f"{p}.0.fn.to_qkv.weight": (3 * DIM, DIM)}
        shapes |= {f"{p}.0.fn.to_out.0.weight": (DIM, DIM), f"{p}.0.fn.to_out.0.bias": (DIM,)}
        shapes |= {f"{p}.1.fn.net.0.weight": (MLP, DIM), f"{p}.1.fn.net.0.bias": (MLP,)}
        shapes |= {f"{p}.1.fn.net.3.weight": (DIM, MLP), f"{p}.1.fn.net.3.bias": (DIM,)}
    state = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    state["position_encoder.generator_raw_params"] = torch.rand(
        shapes["position_encoder.generator_raw_params"], generator=g
    )
    return {"state_dict": {f"model.{k}": v for k, v in state.items()}}


def official_generator(raw: torch.Tensor) -> torch.Tensor:
    """The official skew generator: strict upper triangle of the raw parameters minus its transpose."""
    upper = torch.triu(raw, diagonal=1)
    return upper - upper.transpose(-1, -2)


def official_forward(sd: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """The official RoPEViT math, written from its description: linspace(0, 1) coordinates, layer 0's generators
    in every layer, block rotations R x on consecutive features of every head, CLS unrotated, CLS pooling."""
    s = {k[len("model.") :]: v for k, v in sd["state_dict"].items()}
    batch, grid = images.shape[0], SIDE // PATCH
    patches = images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # (B, C, gh, gw, p1, p2)
    patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(batch, grid * grid, -1)  # (p1 p2 c)
    x = patches @ s["to_patch_embedding.1.weight"].T + s["to_patch_embedding.1.bias"]
    x = torch.cat([s["cls_token"].expand(batch, -1, -1), x], dim=1)
    axis = torch.linspace(0, 1, grid)
    pos = torch.cartesian_prod(axis, axis)  # (n, 2) row-major (row, col)
    gen = official_generator(s["position_encoder.generator_raw_params"][:, 0])  # (axes, blocks, b, b): layer 0
    rot = torch.matrix_exp(torch.einsum("na,agij->ngij", pos, gen))  # (n, blocks, b, b)
    rot = torch.cat([torch.eye(rot.shape[-1]).expand(1, *rot.shape[1:]), rot])  # CLS: identity
    blocks, b = rot.shape[1], rot.shape[-1]
    rot = rot.reshape(rot.shape[0], -1 if blocks > 64 // b else 1, 64 // b, b, b)  # (n, heads', nb, b, b)
    norm = torch.nn.functional.layer_norm
    for i in range(DEPTH):
        p = f"transformer.layers.{i}"
        h = norm(x, (DIM,), s[f"{p}.0.norm.weight"], s[f"{p}.0.norm.bias"])
        q, k, v = (h @ s[f"{p}.0.fn.to_qkv.weight"].T).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, -1, HEADS, 64).transpose(1, 2) for t in (q, k, v))

        def rotate(t):  # (B, H, n, 64): R x per block
            split = t.reshape(batch, HEADS, t.shape[2], 64 // b, b, 1)
            return (rot.transpose(0, 1).unsqueeze(0) @ split).reshape(t.shape)

        q, k = rotate(q), rotate(k)
        attn = ((q @ k.transpose(-1, -2)) * 64**-0.5).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, -1, DIM)
        x = x + out @ s[f"{p}.0.fn.to_out.0.weight"].T + s[f"{p}.0.fn.to_out.0.bias"]
        h = norm(x, (DIM,), s[f"{p}.1.norm.weight"], s[f"{p}.1.norm.bias"])
        h = torch.nn.functional.gelu(h @ s[f"{p}.1.fn.net.0.weight"].T + s[f"{p}.1.fn.net.0.bias"])
        x = x + h @ s[f"{p}.1.fn.net.3.weight"].T + s[f"{p}.1.fn.net.3.bias"]
    cls = norm(x[:, 0], (DIM,), s["mlp_head.0.weight"], s["mlp_head.0.bias"])
    return cls @ s["mlp_head.1.weight"].T + s["mlp_head.1.bias"]


@pytest.mark.parametrize("b", [2, 8, 64])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
def test_official_checkpoint_loads_with_its_generators_and_logits(b, per_layer, per_head):
    sd = official_state(b, per_layer, per_head)
    model = load_official_liere(sd)
    raw = sd["state_dict"]["model.position_encoder.generator_raw_params"]
    blocks = model.encoding.generator_blocks()  # (depth', heads', axes, nb, b, b)
    official = official_generator(raw[:, :1]).unflatten(2, (-1, 64 // b)).permute(1, 2, 0, 3, 4, 5)
    assert torch.equal(blocks, official)  # bit-identical, sign applied
    images = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(images), official_forward(sd, images), rtol=1e-4, atol=1e-4)
    if per_layer:
        each = load_official_liere(sd, layers="each")
        assert each.encoding.generators.shape[0] == DEPTH
        assert torch.equal(each.encoding.generators[:1], model.encoding.generators)


def test_official_checkpoint_from_a_file_and_bad_input(tmp_path, monkeypatch):
    sd = official_state(8, False, False)
    torch.save(sd, tmp_path / "liere.ckpt")
    torch.testing.assert_close(
        load_official_liere(tmp_path / "liere.ckpt").encoding.generators, load_official_liere(sd).encoding.generators
    )
    bad = {k: v for k, v in sd["state_dict"].items()}
    bad["model.transformer.layers.1.1.fn.net.3.weight"] = torch.zeros(DIM, MLP + 1)
    with pytest.raises(ValueError, match=r"transformer.layers.1.1.fn.net.3.weight' has shape \(128, 97\), expected"):
        load_official_liere(bad)
    with pytest.raises(ValueError, match="missing key .to_patch_embedding"):
        load_official_liere({"cls_token": torch.zeros(1, 1, DIM)})
    with pytest.raises(FileNotFoundError, match="no file"):
        load_official_liere(tmp_path / "missing.ckpt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set"):
        load_official_liere("hf:owner/repo/model.ckpt")
    with pytest.raises(ValueError, match="layers must be"):
        load_official_liere(sd, layers="all")
