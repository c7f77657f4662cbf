"""Encodings store their defining settings with their weights (``liere.settings``): a mismatch on load names the
field, state dicts without settings (saved before) still load, and state dicts stay tensors only."""

from __future__ import annotations

import io

import pytest
import torch

import liere
from liere import Grid, PositionEncoding
from liere.settings import SETTINGS_KEY, read_settings, settings_of
from models import ViT

CASES = [(liere.encoding_info(n).example, axes) for n in liere.available() for axes in liere.encoding_info(n).axes]


def encoding(spec: str, axes: int, **options: object) -> PositionEncoding:
    torch.manual_seed(0)
    sizes = dict(head_dim=24, num_axes=axes, num_heads=2, depth=2, dim=48, grid_shape=(3,) * axes)
    return liere.build(spec, **sizes, **options)


def saved_and_loaded(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(("spec", "axes"), CASES)
def test_settings_travel_with_the_weights_and_old_state_dicts_still_load(spec: str, axes: int) -> None:
    state = saved_and_loaded(encoding(spec, axes).state_dict())
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = encoding(spec, axes)
    assert read_settings(state[SETTINGS_KEY]) == settings_of(fresh)
    fresh.load_state_dict(state)  # strict
    old = {k: v for k, v in state.items() if k != SETTINGS_KEY}  # saved before settings were stored
    fresh.load_state_dict(old)  # strict: no missing key
    grid = Grid((3,) * axes)
    torch.testing.assert_close(fresh(grid).to_dense(), encoding(spec, axes)(grid).to_dense(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("spec", "axes", "saved", "loading", "message"),
    [
        ("axial-rope", 2, {}, {"theta": 10000.0}, "theta: checkpoint has 100.0, this encoding has 10000.0"),
        ("rope", 1, {"theta": 500.0}, {}, "theta: checkpoint has 500.0, this encoding has 10000.0"),
        ("rope", 1, {}, {"interpolate_factor": 2.0}, "interpolate_factor: checkpoint has 1.0"),
        ("visionllama", 2, {}, {"coord_convention": "paper"}, "coord_convention: checkpoint has 'index'"),
        ("sincos", 2, {}, {"temperature": 100.0}, "temperature: checkpoint has 10000.0"),
        ("liere8", 2, {}, {"block_size": 4}, "block_size: checkpoint has 8, this encoding has 4"),
        ("comrope-ap8", 2, {}, {"variant": "ld"}, "variant: checkpoint has 'ap', this encoding has 'ld'"),
        ("rope-mixed", 2, {}, {"rot_dim": 16}, "rot_dim: checkpoint has 24, this encoding has 16"),
    ],
)
def test_a_settings_mismatch_names_the_field(spec, axes, saved, loading, message) -> None:
    state = saved_and_loaded(encoding(spec, axes, **saved).state_dict())
    with pytest.raises(ValueError, match=message):
        encoding(spec, axes, **loading).load_state_dict(state)


def test_settings_that_only_initialise_are_not_checked() -> None:
    """``init`` and a learned encoding's ``theta`` choose initial values only: the loaded weights decide."""
    trained = encoding("liere8", 2, init="uniform", theta=100.0)
    other = encoding("liere8", 2)
    other.load_state_dict(trained.state_dict())
    grid = Grid((3, 3))
    torch.testing.assert_close(other(grid).to_dense(), trained(grid).to_dense(), rtol=0, atol=0)


def test_models_check_their_encodings_settings() -> None:
    def vit(theta: float) -> ViT:
        options = {"theta": theta}
        return ViT((3, 16, 16), 5, 8, encoding="axial-rope", dim=32, depth=1, heads=2, encoding_options=options)

    state = saved_and_loaded(vit(100.0).state_dict())
    vit(100.0).load_state_dict(state)
    with pytest.raises(ValueError, match="theta: checkpoint has 100.0, this encoding has 10.0"):
        vit(10.0).load_state_dict(state)
    vit(10.0).load_state_dict({k: v for k, v in state.items() if not k.endswith(SETTINGS_KEY)})  # an old one
    halved = {k: v.half() for k, v in state.items()}  # a state dict converted wholesale keeps readable settings
    vit(100.0).half().load_state_dict(halved)


def test_safetensors_round_trip() -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    model = ViT((3, 16, 16), 5, 8, encoding="liere8", dim=32, depth=1, heads=2)
    restored = ViT((3, 16, 16), 5, 8, encoding="liere8", dim=32, depth=1, heads=2)
    restored.load_state_dict(safetensors.load(safetensors.save(model.state_dict())))
    images = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(restored(images), model(images), rtol=0, atol=0)
