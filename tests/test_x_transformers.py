"""The x-transformers adapter driven through x-transformers' own API: parity, training, kv-cached decoding."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from einops import repeat

from liere import RoPE, grid_coords

x_transformers = pytest.importorskip("x_transformers")
from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper  # noqa: E402
from x_transformers.x_transformers import RotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

from liere.integrations import forward_state  # noqa: E402
from liere.integrations.x_transformers import liere_x_transformers  # noqa: E402
from models.lm import ROTARY_1D  # noqa: E402


def tiny_x_decoder(**decoder_kwargs):
    torch.manual_seed(0)
    decoder = Decoder(**(dict(dim=32, depth=2, heads=2, attn_dim_head=16) | decoder_kwargs))
    return TransformerWrapper(num_tokens=20, max_seq_len=32, use_abs_pos_emb=False, attn_layers=decoder)


def adapted(spec: str, decoder_kwargs: dict | None = None, **wrapper_kwargs):
    model = tiny_x_decoder(**(decoder_kwargs or {}))
    liere_x_transformers(model, spec)
    for name, value in wrapper_kwargs.items():
        setattr(model, name, value)
    return model.eval()


TOKENS = torch.randint(0, 20, (2, 24), generator=torch.Generator().manual_seed(2))

GROUPED_AND_NORMED = {  # x-transformers options that act between the projections and the rotations
    "plain": {},
    "mqa": {"attn_kv_heads": 1},
    "qk_norm": {"attn_qk_norm": True, "attn_qk_norm_dim_scale": True},
    "qk_rmsnorm_gqa": {"attn_qk_rmsnorm": True, "heads": 4, "attn_kv_heads": 2},
}


@pytest.mark.parametrize("rot_dim", [16, 32])
def test_rope_matches_x_transformers_rotary(rot_dim):
    """Same pairs (interleaved ``(2j, 2j+1)``), same frequencies, same partial rotation: equal q k^T."""
    head_dim, n = 32, 50
    q, k = torch.randn(2, 3, n, head_dim), torch.randn(2, 3, n, head_dim)
    freqs, scale = RotaryEmbedding(rot_dim)(torch.arange(n))
    xq = apply_rotary_pos_emb(q, freqs, scale)
    xk = apply_rotary_pos_emb(k, freqs, scale)
    rot = RoPE(head_dim, rot_dim=rot_dim)(grid_coords(n))
    torch.testing.assert_close(rot.apply(q), xq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rot.apply(q) @ rot.apply(k).transpose(-1, -2), xq @ xk.transpose(-1, -2))


def native_rotary_copy(model, **decoder_kwargs):
    """x-transformers' own rotary decoder (``rotary_emb_dim = dim_head``) with ``model``'s weights."""
    native = tiny_x_decoder(rotary_pos_emb=True, rotary_emb_dim=16, **decoder_kwargs)
    missing, unexpected = native.load_state_dict(model.state_dict(), strict=False)
    assert missing == ["attn_layers.rotary_pos_emb.inv_freq"]
    assert unexpected == ["attn_layers.liere_encoding._extra_state"]  # the encoding's settings (liere.settings)
    return native.eval()


def test_x_transformers_adapter_with_rope_equals_native_rotary():
    model = adapted("rope")
    native = native_rotary_copy(model)
    torch.testing.assert_close(model(TOKENS), native(TOKENS), rtol=1e-4, atol=1e-5)
    pos = torch.arange(24) + 7  # custom integer positions
    torch.testing.assert_close(model(TOKENS, pos=pos), native(TOKENS, pos=pos), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", list(GROUPED_AND_NORMED)[1:])
def test_rope_after_qk_norm_and_grouped_heads_equals_native_rotary(options):
    """x-transformers rotates after qk-norm (l2 with its per-feature scale, or RMS) and on grouped key/value heads;
    the adapter rotates there too: same logits and same cached greedy tokens as its own rotary decoder."""
    model = adapted("rope", GROUPED_AND_NORMED[options])
    native = native_rotary_copy(model, **GROUPED_AND_NORMED[options])
    with torch.no_grad():
        if options == "qk_norm":  # move the per-feature scales away from their constant start
            for m in (model, native):
                torch.manual_seed(5)
                for name, p in m.named_parameters():
                    if "qk_norm" in name:
                        p.copy_(torch.rand_like(p) + 0.5)
        torch.testing.assert_close(model(TOKENS), native(TOKENS), rtol=1e-4, atol=1e-5)
        ours = AutoregressiveWrapper(model).generate(TOKENS[:, :4], 16, temperature=0.0, cache_kv=True)
        theirs = AutoregressiveWrapper(native).generate(TOKENS[:, :4], 16, temperature=0.0, cache_kv=True)
    assert torch.equal(ours, theirs)


def test_x_transformers_adapter_trains_liere_causally():
    model = tiny_x_decoder()
    pe = liere_x_transformers(model, "liere8")
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
    with pytest.raises(ValueError, match="rotary_pos_emb=False"):
        liere_x_transformers(tiny_x_decoder(rotary_pos_emb=True))
    with pytest.raises(ValueError, match="cross-attention|rotary_pos_emb=False"):
        liere_x_transformers(tiny_x_decoder(cross_attend=True))
    model = adapted("liere8")
    with pytest.raises(ValueError, match="mems"):
        model(TOKENS, mems=[torch.zeros(2, 3, 32)] * 2)
    with pytest.raises(ValueError, match="pos must be integer"):
        model.attn_layers(torch.randn(2, 24, 32), pos=torch.arange(24.0))
    with pytest.raises(RuntimeError, match="rotations not computed"):
        model.attn_layers.layers[0][1](torch.randn(2, 5, 32))  # one layer alone, outside a forward
    assert forward_state._stack() == []  # a failed forward leaves no rotations behind


# ----------------------------------------------------------------------------------- kv-cached decoding
@pytest.mark.parametrize("spec", ROTARY_1D)
def test_kv_cache_logits_equal_full_recompute(spec):
    """x-transformers' ``test_kv_cache``: logits of the next token with the cache == without it."""
    model = adapted(spec)
    with torch.no_grad():
        full = model(TOKENS)
        logits, cache = model(TOKENS[:, :10], return_intermediates=True)
        steps = [logits]
        for t in range(10, TOKENS.shape[1]):
            logits, cache = model(TOKENS[:, : t + 1], cache=cache, return_intermediates=True)
            steps.append(logits[:, -1:])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_kv_cache_chunks_and_new_tokens_only():
    """Chunked prefill (``cache_age`` tokens at a time) with inputs that exclude the cache."""
    model = adapted("liere8", input_not_include_cache=True)
    with torch.no_grad():
        full = model(TOKENS)
        logits, cache = model(TOKENS[:, :6], return_intermediates=True)
        chunks = [logits]
        for start in range(6, 24, 3):
            chunk = TOKENS[:, start : start + 3]
            logits, cache = model(chunk, cache=cache, cache_age=3, return_intermediates=True)
            chunks.append(logits)
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=1e-5)


def test_seq_start_pos_parity():
    """x-transformers' ``test_seq_start_pos_parity``: left-padded rows decoded token by token."""
    model = adapted("liere8", input_not_include_cache=True)
    seq_start_pos = torch.tensor([5, 0])
    with torch.no_grad():
        parallel = model(TOKENS[:, :10], seq_start_pos=seq_start_pos)
        cache, steps = None, []
        for i in range(10):
            logits, cache = model(
                TOKENS[:, i : i + 1], cache=cache, seq_start_pos=seq_start_pos, return_intermediates=True
            )
            steps.append(logits)
    kept = torch.arange(10) >= seq_start_pos[:, None]
    torch.testing.assert_close(torch.cat(steps, dim=1)[kept], parallel[kept], rtol=0, atol=1e-5)


@pytest.mark.parametrize("options", list(GROUPED_AND_NORMED))
@pytest.mark.parametrize("spec", ["rope", "liere8", "string-cayley"])
def test_generate_with_cache_equals_without(spec, options):
    model = adapted(spec, GROUPED_AND_NORMED[options])
    assert model.can_cache_kv
    wrapper = AutoregressiveWrapper(model)
    prompts = TOKENS[:, :4]
    with torch.no_grad():
        cached = wrapper.generate(prompts, 12, temperature=0.0, cache_kv=True)
        recomputed = wrapper.generate(prompts, 12, temperature=0.0, cache_kv=False)
        lens = torch.tensor([4, 2])  # left-padded prompts: per-sample starts
        padded = wrapper.generate(prompts, 8, temperature=0.0, cache_kv=True, prompt_lens=lens)
        padded_full = wrapper.generate(prompts, 8, temperature=0.0, cache_kv=False, prompt_lens=lens)
    assert torch.equal(cached, recomputed) and torch.equal(padded, padded_full)


def test_generate_rope_tokens_equal_native_rotary_decoder():
    model = adapted("rope")
    native = native_rotary_copy(model)
    prompts = TOKENS[:, :4]
    with torch.no_grad():
        ours = AutoregressiveWrapper(model).generate(prompts, 16, temperature=0.0, cache_kv=True)
        theirs = AutoregressiveWrapper(native).generate(prompts, 16, temperature=0.0, cache_kv=True)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("spec", ROTARY_1D)
def test_generate_past_max_seq_len_cached_equals_uncached(spec):
    """Past ``max_seq_len`` x-transformers trims the oldest cached keys; the kept keys keep their (absolute)
    positions, so cached decoding equals recomputing the window. One layer: with more, the cached keys of later
    layers saw tokens the recomputed window no longer holds (x-transformers' own rotary decoder differs there too)."""
    torch.manual_seed(0)
    decoder = Decoder(dim=32, depth=1, heads=2, attn_dim_head=16)
    model = TransformerWrapper(num_tokens=20, max_seq_len=8, use_abs_pos_emb=False, attn_layers=decoder)
    liere_x_transformers(model, spec)
    wrapper = AutoregressiveWrapper(model.eval())
    with torch.no_grad():
        cached = wrapper.generate(TOKENS[:, :4], 3 * 8, temperature=0.0, cache_kv=True)
        recomputed = wrapper.generate(TOKENS[:, :4], 3 * 8, temperature=0.0, cache_kv=False)
    assert torch.equal(cached, recomputed)


def test_generate_past_max_seq_len_equals_native_rotary_decoder():
    model = adapted("rope")
    native = native_rotary_copy(model)
    prompts = TOKENS[:, :4]
    with torch.no_grad():
        ours = AutoregressiveWrapper(model).generate(prompts, 3 * 32, temperature=0.0, cache_kv=True)
        theirs = AutoregressiveWrapper(native).generate(prompts, 3 * 32, temperature=0.0, cache_kv=True)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("spec", ["liere8", *ROTARY_1D])
def test_custom_rotary_pos_emb(spec):
    """x-transformers' own ``test_custom_rotary_pos_emb`` (training mode, its sizes): explicit positions equal
    the implicit ones, because both are rows of the same table (bitwise, not only allclose)."""
    torch.manual_seed(0)
    model = TransformerWrapper(
        num_tokens=20_000, max_seq_len=1024, attn_layers=Decoder(dim=512, depth=2, heads=8), use_abs_pos_emb=False
    )
    liere_x_transformers(model, spec)
    x = torch.randint(0, 20000, (4, 4))
    pos = repeat(torch.arange(0, 4), "n -> b n", b=4)
    logits1 = model(x, pos=pos)
    logits2 = model(x)
    assert torch.allclose(logits1, logits2)
    assert torch.equal(logits1, logits2)


def test_cached_step_rotates_only_the_new_token():
    model = adapted("liere8")
    sizes = []
    model.attn_layers.liere_encoding.register_forward_hook(lambda m, args, out: sizes.append(out.num_positions))
    with torch.no_grad():
        AutoregressiveWrapper(model).generate(TOKENS[:, :5], 4, temperature=0.0, cache_kv=True)
    assert sizes == [5, 1, 1, 1]  # the prompt once, then one position per new token


# ----------------------------------------------------------------------------------- inference, copies, threads
@pytest.mark.parametrize("spec", ["rope", "liere8"])
def test_x_transformers_inference_mode_first_call_equals_no_grad(spec):
    model = adapted(spec)
    with torch.inference_mode():
        first = model(TOKENS)
    with torch.no_grad():
        torch.testing.assert_close(first, model(TOKENS), rtol=0, atol=0)


def test_x_transformers_deepcopy_pickle_and_save():
    model = adapted("liere8")
    expected = model(TOKENS)
    ema = copy.deepcopy(model)  # an EMA copy must use its own encoding, before and after any forward
    with torch.no_grad():
        ema.attn_layers.liere_encoding.generators.zero_()
    torch.testing.assert_close(model(TOKENS), expected, rtol=0, atol=0)
    assert not torch.allclose(ema(TOKENS), expected)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(other(TOKENS), expected, rtol=0, atol=0)


def test_x_transformers_two_threads_at_different_lengths(run_in_threads):
    model = adapted("liere8")
    inputs = {n: TOKENS[:, :n] for n in (7, 24)}
    with torch.no_grad():
        expected = {n: model(x) for n, x in inputs.items()}

    def run(n: int) -> None:
        with torch.no_grad():
            for _ in range(20):
                torch.testing.assert_close(model(inputs[n]), expected[n], rtol=0, atol=0)

    assert run_in_threads(run, inputs) == []
