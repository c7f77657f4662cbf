"""liere.extend: spectrum rescaling of every rotary encoding, against the fixed-RoPE rule of liere.scaling."""

import pytest
import torch

import liere
from liere import analysis
from liere.extension import ExtendedEncoding, extend, rescale_generators, separability_gap
from liere.rope import AxialRoPE, RoPE, RoPEMixed
from liere.rotations import Rotations
from liere.scaling import rescale_frequencies, scaled_frequencies

HEAD_DIM = 24
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
RULES = [
    {"rope_type": "linear", "factor": 3.0},
    {"rope_type": "dynamic", "factor": 1.0, "original_max_position_embeddings": 8},
    YARN,
    {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
]  # fmt: skip
COMMUTING = ["rope-mixed", "string-cayley", "string-circulant", "rope-basis", "comrope-ap4"]


def rotary_specs() -> list[tuple[str, int]]:
    """(example spec, axes) of every registered rotary encoding."""
    out = []
    for name in liere.available():
        info = liere.encoding_info(name)
        if name not in ("none", "abs", "sincos"):
            out += [(info.example, axes) for axes in info.axes]
    return out


def build(spec: str, axes: int) -> liere.PositionEncoding:
    torch.manual_seed(0)
    return liere.build(spec, head_dim=HEAD_DIM, num_axes=axes, num_heads=2, depth=2)


def rotate(pe: liere.PositionEncoding, coords: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    rot = pe(coords)
    return [rot.for_layer(layer).apply(x) for layer in range(2)]


@pytest.mark.parametrize("spec,axes", rotary_specs())
def test_default_rule_keeps_every_encoding(spec, axes):
    pe = build(spec, axes)
    coords, x = torch.rand(6, axes) * 12, torch.randn(2, 2, 6, HEAD_DIM)
    for got, want in zip(rotate(extend(pe, {"rope_type": "default"}), coords, x), rotate(pe, coords, x), strict=True):
        torch.testing.assert_close(got, want, atol=5e-6, rtol=0)


@pytest.mark.parametrize("params", RULES + [{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                              "attention_factor": 1.5}])  # fmt: skip
def test_rope_equals_scaled_frequencies(params):
    """Fixed RoPE extended = RoPE at transformers' frequencies, q and k each times the attention factor."""
    pe = RoPE(HEAD_DIM, rot_dim=12)
    positions = torch.arange(40.0)[:, None]
    freqs, attention = scaled_frequencies(12, params | {"rope_theta": 10000.0}, seq_len=40)
    want = Rotations.from_angles((positions * freqs)[None, None, None], HEAD_DIM)
    want = Rotations(HEAD_DIM, cos=want.cos * attention, sin=want.sin * attention)
    x = torch.randn(1, 1, 40, HEAD_DIM)
    torch.testing.assert_close(extend(pe, params)(positions).apply(x), want.apply(x), atol=2e-5, rtol=1e-5)


def test_axial_rope_per_axis_extents():
    pe = AxialRoPE(HEAD_DIM, num_axes=2, theta=100.0)
    rows = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 6, "rope_theta": 100.0}
    cols = rows | {"original_max_position_embeddings": 4}
    coords = torch.rand(5, 2) * 10
    angles = []
    for axis, params in enumerate((rows, cols)):
        freqs, _ = rescale_frequencies(pe.freqs, params, dim=pe.rot_dim // 2)
        angles.append(coords[:, axis, None] * freqs)
    want = Rotations.from_angles(torch.cat(angles, -1)[None, None, None], HEAD_DIM)
    attention = scaled_frequencies(8, rows)[1]
    x = torch.randn(1, 1, 5, HEAD_DIM)
    got = extend(pe, [rows, cols])(coords).apply(x)
    torch.testing.assert_close(got, want.apply(x) * attention, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("params", RULES)
def test_rope_mixed_equals_rule_on_each_frequency(params):
    pe = build("rope-mixed", 2)
    expected = RoPEMixed(HEAD_DIM, num_axes=2, num_heads=2, depth=2)
    coords, x = torch.rand(7, 2) * 20, torch.randn(1, 2, 7, HEAD_DIM)
    params = params | {"rope_theta": pe.theta}
    with torch.no_grad():
        for axis in range(2):
            seq_len = int(coords[:, axis].max()) + 1  # dynamic: the length in use on this axis
            w, attention = rescale_frequencies(pe.freqs[:, :, axis].abs(), params, dim=12, seq_len=seq_len)
            expected.freqs[:, :, axis] = w * pe.freqs[:, :, axis].sign()
    for got, want in zip(rotate(extend(pe, params), coords, x), rotate(expected, coords, x), strict=True):
        torch.testing.assert_close(got, want * attention, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", COMMUTING)
@pytest.mark.parametrize("params", RULES)
def test_commuting_families_spectrum_follows_the_rule(spec, params):
    """Per axis, the extended generator's frequencies are the rule applied to the original frequencies; the
    extended generators still commute, so R(p) is the product of the per-axis extended rotations."""
    pe = build(spec, 2)
    ex = extend(pe, params)
    gens, width = pe.skew_generators().detach().double(), ex.width
    new = ex.scaled()[0]
    theta = params.get("rope_theta", pe.theta)
    want = rescale_frequencies(analysis.frequencies(gens[..., : pe.rot_dim, : pe.rot_dim]),
                               params | {"rope_theta": theta}, dim=width)[0]  # fmt: skip
    torch.testing.assert_close(analysis.frequencies(new), want.sort(-1, descending=True).values, atol=1e-9, rtol=1e-7)
    assert separability_gap(ex, torch.rand(5, 2) * 10).max() < 1e-9


def test_liere_linear_is_position_interpolation():
    """For every generator family, linear scaling equals dividing the positions by the factor."""
    pe = build("liere8", 2)
    coords, x = torch.rand(6, 2) * 12, torch.randn(1, 2, 6, HEAD_DIM)
    got = rotate(extend(pe, {"rope_type": "linear", "factor": 2.5}), coords, x)
    for g, w in zip(got, rotate(pe, coords / 2.5, x), strict=True):
        torch.testing.assert_close(g, w, atol=5e-6, rtol=0)


def test_liere_off_axis_gap_follows_commutators():
    """Non-commuting LieRE: exact on each axis, and off the axes the gap to the product of per-axis rotations is
    second order in the positions, about p_a p_b |[f(A), f(B)]| / 2."""
    pe = build("liere8", 2)
    ex = extend(pe, YARN)
    on_axis = torch.tensor([[3.0, 0.0], [0.0, 5.0]])
    assert separability_gap(ex, on_axis).max() < 1e-9
    gens = ex.scaled()[0]
    comm = torch.linalg.matrix_norm(gens[:, :, 0] @ gens[:, :, 1] - gens[:, :, 1] @ gens[:, :, 0]) / HEAD_DIM**0.5
    small = torch.tensor([[1e-2, 1e-2]])
    gap = separability_gap(ex, small)[..., 0]
    torch.testing.assert_close(gap, 0.5 * 1e-4 * comm, rtol=0.05, atol=1e-12)
    assert gap.min() > 0


def test_dynamic_recomputes_for_the_length_in_use():
    """A table computed at one length never serves another: the first 16 positions of a 64-long sequence rotate
    with the 64-length frequencies, and a 16-long sequence with the original ones."""
    pe = RoPE(HEAD_DIM)
    ex = extend(pe, {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}).eval()
    x = torch.randn(1, 1, 64, HEAD_DIM)
    for length in (64, 16, 64):
        positions = torch.arange(float(length))[:, None]
        freqs, _ = scaled_frequencies(HEAD_DIM, {"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16,
                                      seq_len=length)  # fmt: skip
        want = Rotations.from_angles((positions * freqs)[None, None, None], HEAD_DIM).apply(x[:, :, :length])
        torch.testing.assert_close(ex(positions).apply(x[:, :, :length]), want, atol=3e-5, rtol=1e-5)


def test_rescale_generators_keeps_skew_and_spectrum_order():
    gens = build("liere8", 1).skew_generators().double()[..., 0, :, :]
    scaled, attention = rescale_generators(gens, YARN | {"rope_theta": 100.0}, dim=HEAD_DIM)
    torch.testing.assert_close(scaled, -scaled.mT)
    assert attention == scaled_frequencies(HEAD_DIM, YARN)[1]


def test_original_is_unchanged():
    pe = build("rope-mixed", 2)
    before = pe.freqs.clone()
    ex = extend(pe, YARN)
    assert isinstance(ex, ExtendedEncoding) and torch.equal(pe.freqs, before)


@pytest.mark.parametrize(
    "pe,params,message",
    [
        (liere.build("none", head_dim=HEAD_DIM, num_axes=1), YARN, "extend: NoPE is not a rotary encoding"),
        (
            liere.build("abs", head_dim=HEAD_DIM, num_axes=1, dim=HEAD_DIM, grid_shape=(8,)),
            YARN,
            "extend: LearnedAbsolute is not a rotary",
        ),
        (RoPE(HEAD_DIM), [YARN, YARN], "extend: rope_parameters lists 2 dicts for 1 axes"),
        (RoPE(HEAD_DIM), {"rope_type": "ntk"}, "unknown rope_type 'ntk'"),
        (RoPE(HEAD_DIM), {"rope_type": "yarn", "factor": 2.0}, "needs original_max_position_embeddings"),
    ],
)
def test_bad_input(pe, params, message):
    with pytest.raises(ValueError) as err:
        extend(pe, params)
    assert message in str(err.value) and "\n" not in str(err.value)
