"""``CharLM`` kv-cached decoding: cached logits equal full recomputation for every 1D encoding.

The cached ``generate`` example of docs/models.md is executed by ``tests/test_api.py``.
"""

from __future__ import annotations

import pytest
import torch

from liere import Grid
from models import CharLM
from models.blocks import KVCache
from models.lm import ROTARY_1D

SPECS = [*ROTARY_1D, "abs", "sincos"]
TOKENS = torch.randint(0, 20, (2, 20), generator=torch.Generator().manual_seed(0))


def tiny_lm(spec: str) -> CharLM:
    torch.manual_seed(0)
    return CharLM(20, context=16, encoding=spec, dim=32, depth=2, heads=2).eval()


@pytest.mark.parametrize("spec", SPECS)
def test_cached_logits_equal_full_recompute(spec):
    model = tiny_lm(spec)
    with torch.no_grad():
        full = model(TOKENS)
        cache = KVCache()
        steps = [model(TOKENS[:, :6], cache), model(TOKENS[:, 6:9], cache)]  # prompt, then a chunk
        steps += [model(TOKENS[:, t : t + 1], cache) for t in range(9, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["rope", "liere8", "comrope-ap4"])
def test_generate_cached_equals_uncached(spec):
    model = tiny_lm(spec)
    greedy = [model.generate(TOKENS[:, :5], 12, temperature=0.0, use_cache=c) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1]) and greedy[0].shape == (2, 17)
    sampled = [
        model.generate(TOKENS[:, :5], 8, top_k=5, use_cache=c, generator=torch.Generator().manual_seed(1))
        for c in (True, False)
    ]
    assert torch.equal(sampled[0], sampled[1])


def test_cached_step_rotates_only_the_new_token():
    model = tiny_lm("liere8")
    sizes = []
    model.encoding.register_forward_hook(lambda m, args, out: sizes.append(out.num_positions))
    model.generate(TOKENS[:, :5], 4, temperature=0.0)
    assert sizes == [5, 1, 1, 1]


@pytest.mark.parametrize("spec", ["liere8", "rope-basis"])
def test_cached_steps_slice_one_position_table(spec):
    """Decoding steps read rows of one table of positions: computed log2(length) times, not once per token, and
    the same rows a full forward of the whole sequence uses (so cached and uncached decoding agree to the bit)."""
    model = tiny_lm(spec)
    calls, rotations = [], model.encoding.rotations
    model.encoding.rotations = lambda *args, **kwargs: calls.append(1) or rotations(*args, **kwargs)
    out = model.generate(TOKENS[:, :5], 40, temperature=0.0)
    assert len(calls) <= 5  # the table grows 5 -> 10 -> 20 -> 40 -> 80 positions
    with torch.no_grad():
        full = model.encoding(Grid((45,))).to_dense()
        steps = [model.encoding(Grid((1,), offset=float(i))).to_dense() for i in range(45)]
    assert torch.equal(torch.cat(steps, dim=3), full) and len(calls) <= 5
    assert torch.equal(out, model.generate(TOKENS[:, :5], 40, temperature=0.0, use_cache=False))


def test_generate_rejects_bad_arguments():
    model = tiny_lm("rope")
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(TOKENS, 0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(TOKENS, 2, temperature=-1.0)
