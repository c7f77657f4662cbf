"""Adapters to third-party models: liere encodings inside timm's ViT, and parity with x-transformers' rotary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import liere
from liere import RoPE, grid_coords

timm = pytest.importorskip("timm")
from liere.integrations.timm import RotaryTimmAttention, liere_timm_vit  # noqa: E402

TINY_TIMM = dict(img_size=32, patch_size=8, depth=2, num_classes=5)


def tiny_timm_vit(encoding: str, **kwargs):
    torch.manual_seed(0)
    return liere_timm_vit("vit_tiny_patch16_224", encoding, create_kwargs=TINY_TIMM | kwargs)


@pytest.mark.parametrize("spec", ["liere8", "rope-mixed", "sincos"])
def test_timm_vit_trains_one_step(spec):
    model = tiny_timm_vit(spec)
    assert model.pos_embed is None and all(isinstance(b.attn, RotaryTimmAttention) for b in model.blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.liere_encoding.named_parameters():
        per_layer = param.grad.flatten(1).abs().sum(dim=1)
        assert torch.isfinite(param.grad).all() and (per_layer > 0).all(), f"{name}: {per_layer.tolist()}"
    opt.step()
    assert model.blocks[0].attn.rotations.rot is None  # released after the forward


def test_timm_attention_uses_the_encoding_rotations_with_cls_unrotated():
    model = tiny_timm_vit("liere8", reg_tokens=2).eval()
    captured = {}
    model.blocks[1].attn.register_forward_hook(lambda m, args, out: captured.update(x=args[0], out=out))
    model(torch.randn(2, 3, 32, 32))

    attn, x = model.blocks[1].attn, captured["x"]
    rot = model.liere_encoding(grid_coords(4, 4), num_prefix_tokens=3)[1]  # CLS + 2 registers unrotated
    q, k, v = attn.qkv(x).reshape(2, 19, 3, 3, 64).permute(2, 0, 3, 1, 4).unbind(0)
    scores = (rot.apply(q) @ rot.apply(k).transpose(-1, -2)) / 8.0
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 19, 192))
    torch.testing.assert_close(captured["out"], expected, rtol=1e-4, atol=1e-5)
    dense = rot.to_dense()[0, 0, :, :3]
    torch.testing.assert_close(dense, torch.eye(64).expand_as(dense))


def test_timm_rotations_computed_once_per_forward():
    model = tiny_timm_vit("liere8")
    calls = []
    model.liere_encoding.register_forward_hook(lambda *_: calls.append(1))
    model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 1


def test_timm_dynamic_image_size_grows_the_grid():
    model = tiny_timm_vit("rope-mixed", dynamic_img_size=True).eval()
    grids = []
    model.liere_encoding.register_forward_hook(lambda module, args, out: grids.append(args[0]))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 64))
    assert out.shape == (1, 5) and grids == [liere.Grid((6, 8))]


def test_timm_abs_keeps_timm_pos_embed_and_bad_models_are_rejected():
    model = tiny_timm_vit("abs")
    assert model.pos_embed is not None and not hasattr(model, "liere_encoding")
    with pytest.raises(TypeError, match="VisionTransformer"):
        liere_timm_vit(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="patch dropout"):
        tiny_timm_vit("liere8", patch_drop_rate=0.1)


# ----------------------------------------------------------------------------------- x-transformers
@pytest.mark.parametrize("rot_dim", [16, 32])
def test_rope_matches_x_transformers_rotary(rot_dim):
    """Same pairs (interleaved ``(2j, 2j+1)``), same frequencies, same partial rotation: equal q k^T."""
    x_transformers = pytest.importorskip("x_transformers.x_transformers")
    head_dim, n = 32, 50
    q, k = torch.randn(2, 3, n, head_dim), torch.randn(2, 3, n, head_dim)
    freqs, scale = x_transformers.RotaryEmbedding(rot_dim)(torch.arange(n))
    xq = x_transformers.apply_rotary_pos_emb(q, freqs, scale)
    xk = x_transformers.apply_rotary_pos_emb(k, freqs, scale)
    rot = RoPE(head_dim, rot_dim=rot_dim)(grid_coords(n))
    torch.testing.assert_close(rot.apply(q), xq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rot.apply(q) @ rot.apply(k).transpose(-1, -2), xq @ xk.transpose(-1, -2))


def x_transformers_adapter():
    """The x-transformers adapter function (skips the test when x-transformers is not installed)."""
    pytest.importorskip("x_transformers")
    from liere.integrations.x_transformers import liere_x_transformers

    return liere_x_transformers


def tiny_x_decoder(**decoder_kwargs):
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(0)
    decoder = Decoder(dim=32, depth=2, heads=2, attn_dim_head=16, **decoder_kwargs)
    return TransformerWrapper(num_tokens=20, max_seq_len=32, use_abs_pos_emb=False, attn_layers=decoder)


def test_x_transformers_adapter_with_rope_equals_native_rotary():
    adapted = tiny_x_decoder()
    x_transformers_adapter()(adapted, "rope")
    native = tiny_x_decoder(rotary_pos_emb=True, rotary_emb_dim=16)
    missing, unexpected = native.load_state_dict(adapted.state_dict(), strict=False)
    assert missing == ["attn_layers.rotary_pos_emb.inv_freq"] and unexpected == []
    tokens = torch.randint(0, 20, (2, 24))
    torch.testing.assert_close(adapted(tokens), native(tokens), rtol=1e-4, atol=1e-5)


def test_x_transformers_adapter_trains_liere_causally():
    model = tiny_x_decoder()
    pe = x_transformers_adapter()(model, "liere8")
    tokens = torch.randint(0, 20, (2, 25))
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    per_layer = pe.generators.grad.flatten(1).abs().sum(dim=1)
    assert per_layer.shape == (2,) and (per_layer > 0).all()
    changed = tokens[:, :-1].clone()
    changed[:, 12] = (changed[:, 12] + 1) % 20
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :12], logits[:, :12].detach())


def test_x_transformers_adapter_rejects_what_it_cannot_place():
    adapter = x_transformers_adapter()
    with pytest.raises(ValueError, match="rotary_pos_emb=False"):
        adapter(tiny_x_decoder(rotary_pos_emb=True))
    with pytest.raises(ValueError, match="qk-norm"):
        adapter(tiny_x_decoder(attn_qk_norm=True))
    model = tiny_x_decoder()
    adapter(model, "liere8")
    with pytest.raises(ValueError, match="seq_start_pos"):
        model(torch.randint(0, 20, (2, 8)), seq_start_pos=torch.tensor([0, 2]))
