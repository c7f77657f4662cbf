"""liere.scaling against transformers' ROPE_INIT_FUNCTIONS (live where installed, and stored fixtures)."""

import json
import math
from pathlib import Path

import pytest
import torch

from liere import scaled_frequencies
from liere.scaling import ROPE_TYPES, rescale_frequencies

HEAD_DIM, MAX_POSITIONS = 32, 128
FIXTURES = Path(__file__).with_name("scaling_fixtures.json")
SHORT, LONG = [1.0 + 0.1 * i for i in range(16)], [1.5 + 0.2 * i for i in range(16)]
CASES = [
    ({"rope_type": "default", "rope_theta": 10000.0}, {}),
    ({"rope_type": "linear", "rope_theta": 100.0, "factor": 2.0, "partial_rotary_factor": 0.5}, {}),
    ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, {}),
    ({"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0}, {"seq_len": 300}),
    ({"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0}, {"seq_len": 100}),
    ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}, {}),
    (
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 2048,
            "beta_fast": 16,
            "beta_slow": 2,
            "truncate": False,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
        },
        {},
    ),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "attention_factor": 1.3}, {}),
    (
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "partial_rotary_factor": 0.5,
        },
        {},
    ),
    (
        {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "original_max_position_embeddings": 64,
            "short_factor": SHORT,
            "long_factor": LONG,
        },
        {"seq_len": 100},
    ),
    (
        {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "factor": 3.0,
            "original_max_position_embeddings": 64,
            "short_factor": SHORT,
            "long_factor": LONG,
        },
        {"seq_len": 10},
    ),
    (
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {},
    ),
]


def transformers_reference(params: dict, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """transformers' own frequencies and attention factor for ``params`` on a tiny Llama config."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters=dict(params),
    )
    if params["rope_type"] == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu", seq_len=seq_len)


def assert_matches(params: dict, kwargs: dict, reference: torch.Tensor, attention: float) -> None:
    freqs, factor = scaled_frequencies(HEAD_DIM, params, max_position_embeddings=MAX_POSITIONS, **kwargs)
    assert freqs.dtype == torch.float32
    torch.testing.assert_close(freqs, reference.float(), rtol=4e-7, atol=0)
    assert math.isclose(factor, attention, rel_tol=1e-12)


def test_cases_cover_every_type():
    assert {params["rope_type"] for params, _ in CASES} == set(ROPE_TYPES)


@pytest.mark.parametrize("params,kwargs", CASES, ids=[f"{p['rope_type']}-{i}" for i, (p, _) in enumerate(CASES)])
def test_equals_transformers(params, kwargs):
    pytest.importorskip("transformers", reason="transformers is not installed: the stored fixtures cover this")
    assert_matches(params, kwargs, *transformers_reference(params, **kwargs))


def test_equals_stored_fixtures():
    """The same cases, computed once with transformers 5.25 (runs without transformers)."""
    fixtures = json.loads(FIXTURES.read_text())
    assert len(fixtures) == len(CASES)
    for fixture, (params, kwargs) in zip(fixtures, CASES, strict=True):
        assert fixture["rope_parameters"] == params and fixture.get("seq_len") == kwargs.get("seq_len")
        assert_matches(params, kwargs, torch.tensor(fixture["frequencies"]), fixture["attention_factor"])


def test_dynamic_is_default_up_to_the_trained_length():
    params = {"rope_type": "dynamic", "factor": 4.0}
    base, _ = scaled_frequencies(HEAD_DIM, {})
    for seq_len in (None, 10, MAX_POSITIONS):
        torch.testing.assert_close(
            scaled_frequencies(HEAD_DIM, params, max_position_embeddings=MAX_POSITIONS, seq_len=seq_len)[0], base
        )
    longer = scaled_frequencies(HEAD_DIM, params, max_position_embeddings=MAX_POSITIONS, seq_len=4 * MAX_POSITIONS)[0]
    assert longer[0] == base[0] and (longer[1:] < base[1:]).all()


def test_longrope_factors_follow_frequency_rank():
    """rescale_frequencies gives the k-th largest frequency the k-th factor, whatever the order of the input."""
    params = {
        "rope_type": "longrope",
        "original_max_position_embeddings": 64,
        "factor": 2.0,
        "short_factor": SHORT,
        "long_factor": LONG,
    }
    base, _ = scaled_frequencies(HEAD_DIM, {})
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    scaled, _ = rescale_frequencies(base[perm], params, dim=HEAD_DIM, seq_len=100)
    torch.testing.assert_close(scaled, (base / torch.tensor(LONG))[perm])


@pytest.mark.parametrize(
    "params,kwargs,message",
    [
        ({"rope_type": "ntk"}, {}, "unknown rope_type 'ntk'; known: default, linear, dynamic, yarn, longrope, llama3"),
        ({"rope_type": "linear", "factor": 0}, {}, "factor must be a number > 0, got 0"),
        ({"rope_type": "linear", "factor": -2.0}, {}, "factor must be a number > 0"),
        ({"rope_type": "linear"}, {}, "rope_type 'linear' needs factor"),
        ({"rope_type": "yarn", "factor": 4.0}, {}, "rope_type 'yarn' needs original_max_position_embeddings"),
        ({"rope_type": "dynamic", "factor": 2.0}, {}, "needs original_max_position_embeddings"),
        (
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
            {},
            "rope_type 'llama3' needs original_max_position_embeddings",
        ),
        (
            {
                "rope_type": "longrope",
                "original_max_position_embeddings": 8,
                "factor": 2.0,
                "short_factor": SHORT[:3],
                "long_factor": LONG,
            },
            {},
            "short_factor must list 16 factors (one a pair), got length 3",
        ),
        (
            {"rope_type": "longrope", "original_max_position_embeddings": 8, "factor": 2.0, "short_factor": SHORT},
            {},
            "long_factor must list 16 factors (one a pair), got missing",
        ),
        ({"rope_type": "linear", "factor": 2.0, "beta_fast": 3}, {}, "rope_type 'linear' does not use ['beta_fast']"),
        ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}, {}, "positive int, got 0"),
    ],
)
def test_bad_parameters(params, kwargs, message):
    with pytest.raises(ValueError) as err:
        scaled_frequencies(HEAD_DIM, params, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
