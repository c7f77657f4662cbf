"""Small conventions: explicit ``Rotations.kind``, shape-defining reprs, fp32 frequencies under ``.to(dtype)``, and
errors that name the argument the user gave."""

from __future__ import annotations

import pytest
import torch

import liere
from liere import Grid, Rotations, grid_coords


@pytest.mark.parametrize(
    ("spec", "num_axes", "kind"),
    [("none", 2, "identity"), ("rope", 1, "pairs"), ("rope-mixed", 2, "pairs"), ("string-cayley", 2, "pairs_in_basis"),
     ("liere8", 2, "blocks"), ("string-circulant", 2, "blocks")],
)  # fmt: skip
def test_rotations_kind_and_constructors(spec: str, num_axes: int, kind: str) -> None:
    rot = liere.build(spec, head_dim=16, num_axes=num_axes, num_heads=2, depth=2)(grid_coords(*[3] * num_axes))
    assert rot.kind == kind and rot.with_prefix(1).for_layer(1).kind == kind and rot.transpose().kind == kind
    angles = torch.randn(1, 1, 2, 5, 4)
    assert Rotations.from_angles(angles, 8).kind == "pairs"
    assert Rotations.from_angles(angles, 8, basis=torch.eye(8).expand(1, 2, 8, 8)).kind == "pairs_in_basis"


def test_extra_repr_shows_the_shape_defining_arguments() -> None:
    text = repr(liere.LieRE(head_dim=64, num_axes=2, num_heads=12, depth=12, block_size=8))
    assert text.startswith("LieRE(head_dim=64, num_axes=2, num_heads=12, depth=12, block_size=8, rot_dim=64")
    assert repr(liere.RoPE(64)) == "RoPE(head_dim=64, num_axes=1, depth=1, rot_dim=64, theta=10000.0)"


def test_rope_frequencies_stay_fp32_under_model_to_bf16() -> None:
    n = 4096
    pe = liere.RoPE(64).to(torch.bfloat16)
    assert pe.freqs.dtype == torch.float32
    q = torch.randn(1, 1, n, 64).bfloat16()
    reference = liere.RoPE(64)(grid_coords(n)).apply(q.float())
    for coords in (Grid((n,)), grid_coords(n)):
        # the only error left is the bf16 rounding of the output
        assert torch.equal(pe(coords).apply(q), reference.bfloat16())
    axial = liere.AxialRoPE(16, 2).to(torch.float16)
    assert axial.freqs.dtype == torch.float32 and axial.to("cpu").freqs.dtype == torch.float32


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda v: liere.RoPE(16, theta=v), "theta"),
        (lambda v: liere.AxialRoPE(16, 2, theta=v), "theta"),
        (lambda v: liere.RoPEMixed(16, 2, theta=v), "theta"),
        (lambda v: liere.LieRE(16, 2, theta=v), "theta"),
        (lambda v: liere.ComRoPE(16, 2, theta=v), "theta"),
        (lambda v: liere.RoPEBasis(16, 1, theta=v), "theta"),
        (lambda v: liere.CayleySTRING(16, 2, theta=v), "theta"),
        (lambda v: liere.CirculantSTRING(16, 2, theta=v), "theta"),
        (lambda v: liere.SinCosAbsolute(16, 2, 8, temperature=v), "temperature"),
        (lambda v: liere.build(f"rope:theta={v}", head_dim=16), "theta"),
    ],
)
def test_bad_frequency_bases_raise_naming_the_argument(make, name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{name} must be finite and > 0"):
        make(value)


def test_errors_name_head_dim_when_rot_dim_was_not_given() -> None:
    with pytest.raises(ValueError, match="head_dim=15") as err:
        liere.LieRE(head_dim=15, block_size=3)
    assert "rot_dim" not in str(err.value)
    with pytest.raises(ValueError, match="head_dim=6 must be divisible by 4"):
        liere.RoPEMixed(6, 2)
    assert liere.LieRE(head_dim=15, num_axes=1, block_size=3).rot_dim == 15
