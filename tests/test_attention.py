"""liere.rotary_attention with grouped key/value heads and queries shorter than keys, against plain SDPA."""

import pytest
import torch
import torch.nn.functional as F

import liere
from liere import Grid, rotary_attention


def rotate_dense(rot: liere.Rotations, x: torch.Tensor) -> torch.Tensor:
    """``R(p_i) x_i`` with the full matrices (the independent reference), x ``(b, h, n, d)``."""
    return torch.einsum("shnij,bhnj->bhni", rot.to_dense()[0], x)


SPECS = ["rope", "liere8", "rope-mixed", "comrope-ap8", "string-cayley"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("rot_heads", ["kv", "q", "shared"])
def test_grouped_heads_and_short_queries_match_sdpa(spec: str, rot_heads: str) -> None:
    """Hq = 6 query heads over Hkv = 2 key/value heads, 3 queries at the last of 7 key positions."""
    torch.manual_seed(0)
    hq, hkv, nq, nk, d = 6, 2, 3, 7, 16
    heads = {"kv": hkv, "q": hq, "shared": 1}[rot_heads]
    pe = liere.build(spec, head_dim=d, num_heads=heads)
    with torch.no_grad():
        for p in pe.parameters():
            p.normal_(0, 0.3)
    rot = pe(Grid((nk,)))[0]
    q, k, v = torch.randn(2, hq, nq, d), torch.randn(2, hkv, nk, d), torch.randn(2, hkv, nk, d)
    mask = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)  # causal, bottom-right aligned
    out = rotary_attention(q, k, v, rot, attn_mask=mask)
    # reference: repeat kv per query head, rotate every head with its own (or its group's) dense matrices
    dense = rot.to_dense()[0]  # (S, H, nk, d, d)
    heads = dense.shape[1]  # 1 for encodings without per-head parameters
    group_of = torch.arange(hq) // (hq // heads) if heads > 1 else torch.zeros(hq, dtype=torch.long)
    per_q = dense[:, group_of]  # (S, hq, nk, d, d)
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    qrot = torch.einsum("shnij,bhnj->bhni", per_q[:, :, nk - nq :], q)
    krot = torch.einsum("shnij,bhnj->bhni", per_q, kr)
    expected = F.scaled_dot_product_attention(qrot, krot, vr, attn_mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if heads != hq:  # same as SDPA's own grouped attention on the rotated keys
        krot_kv = rotate_dense(rot, k) if heads == hkv else torch.einsum("snij,bhnj->bhni", dense[:, 0], k)
        gqa = F.scaled_dot_product_attention(qrot, krot_kv, v, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(out, gqa, atol=1e-5, rtol=1e-5)


def test_decoding_step_equals_full_attention_rows() -> None:
    """Causal attention over n tokens, last row = one query against all n keys (a cached decoding step)."""
    torch.manual_seed(1)
    pe = liere.build("liere8", head_dim=16, num_heads=2)
    rot = pe(Grid((9,)))[0]
    q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    full = rotary_attention(q, k, v, rot, is_causal=True)
    step = rotary_attention(q[:, :, -1:], k, v, rot)
    torch.testing.assert_close(step, full[:, :, -1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "pattern"),
    [
        ((1, 3, 4, 16), (1, 2, 4, 16), "multiple of k's 2"),
        ((1, 4, 9, 16), (1, 2, 8, 16), "9 tokens but k only 8"),
        ((1, 4, 4, 16), (1, 2, 4, 8), "do not fit"),
        ((1, 4, 4, 16), (1, 2, 5, 16), "rot holds 4 positions, k 5"),
    ],
)
def test_bad_shapes_raise(q_shape: tuple, k_shape: tuple, pattern: str) -> None:
    rot = liere.build("rope", head_dim=16)(Grid((4,)))
    with pytest.raises(ValueError, match=pattern):
        rotary_attention(torch.randn(q_shape), torch.randn(k_shape), torch.randn(k_shape), rot)
