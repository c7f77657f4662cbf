"""train.ab.inspect: commutators, eigen-frequencies, relative-position kernels of learned generators; CLI, logging."""

from __future__ import annotations

import json
import math

import pytest
import torch

import liere
from liere import analysis
from models import ViT
from train.ab import inspect
from train.ab import runner as ab
from train.run_dir import read_jsonl


def vit(encoding: str, grid: int = 5) -> ViT:
    torch.manual_seed(0)
    return ViT((1, 4 * grid, 4 * grid), 3, 4, encoding=encoding, dim=32, depth=2, heads=2)


@pytest.mark.parametrize("spec", ["rope-mixed", "liere2", "liere8", "string-circulant", "comrope-ap4"])
def test_commuting_generators_have_zero_commutator_and_invariant_kernel(spec):
    info = inspect.inspect_model(vit(spec))  # liere8 with init="rope" starts at RoPE-Mixed: commuting
    assert info["commutator"].shape == (2, 2, 1)
    assert info["commutator"].abs().max() < 1e-6
    assert info["invariance_error"].max() < 1e-6


@pytest.mark.parametrize("spec", ["liere8:init=uniform", "liere16:init=normal,init_std=0.3"])
def test_random_liere_does_not_commute_nor_stay_translation_invariant(spec):
    info = inspect.inspect_model(vit(spec))
    assert info["commutator"].min() > 0.05
    assert info["invariance_error"].min() > 1e-3


def test_commutator_matches_direct_formula_for_all_3d_pairs():
    gens = liere.LieRE(head_dim=8, num_axes=3, num_heads=2, depth=1, block_size=8, init="uniform").skew_generators()
    sizes = analysis.commutator_sizes(gens.detach().double())
    assert sizes.shape == (1, 2, 3)
    A, B = gens[0, 1, 0].double(), gens[0, 1, 2].double()  # pair (0, 2) of head 1
    expected = torch.linalg.norm(A @ B - B @ A) / (torch.linalg.norm(A) * torch.linalg.norm(B))
    torch.testing.assert_close(sizes[0, 1, 1], expected.detach())
    assert analysis.axis_pairs(3) == [(0, 1), (0, 2), (1, 2)]


def test_frequencies_are_the_constructed_rotation_rates():
    pe = liere.build("rope-mixed", head_dim=16, num_axes=2, num_heads=3, depth=2)
    freqs = analysis.frequencies(pe.skew_generators().detach().double())
    expected = pe.freqs.detach().double().abs().sort(dim=-1, descending=True).values
    torch.testing.assert_close(freqs, expected)
    # a 3x3 block [[0, -c, b], [c, 0, -a], [-b, a, 0]] rotates at rate |(a, b, c)| about its axis
    block = torch.tensor([[0.0, -3.0, 0.0], [3.0, 0.0, -4.0], [0.0, 4.0, 0.0]], dtype=torch.float64)
    freqs = analysis.frequencies(block.expand(1, 1, 1, 3, 3)).flatten()
    torch.testing.assert_close(freqs, torch.tensor([5.0]).double())


def test_kernel_is_one_at_the_query_and_depends_on_offset_for_rope_mixed():
    model = vit("rope-mixed", grid=4)
    gens = analysis.generators(model)
    coords = model.coords(model.train_grid).double()
    k = inspect.kernel(gens, coords, 5)
    torch.testing.assert_close(k[..., 5], torch.ones(2, 2, dtype=torch.float64))
    # offset (1, 1) from (1, 1) [index 5] and from (2, 2) [index 10]: same value
    torch.testing.assert_close(k[..., 10], inspect.kernel(gens, coords, 10)[..., 15])
    assert math.isclose(float(inspect.invariance_error(gens, coords, (4, 4), 5, 10).max()), 0.0, abs_tol=1e-9)


@pytest.mark.slow
def test_metrics_log_commutator_and_cli_writes_section(tmp_path, capsys):
    out = tmp_path / "ab"
    ab.main(["--preset", "smoke", "--steps", "10", "--quiet", "--evaluate", "none", "--jobs", "1",
             "--encodings", "none,liere8:init=uniform", "--out", str(out)])  # fmt: skip
    records = [r for r in read_jsonl(out / "liere8_init=uniform-s0" / "metrics.jsonl") if "commutator_mean" in r]
    assert records and all(r["commutator_max"] >= r["commutator_mean"] > 0.05 for r in records)
    assert {"commutator_l0", "commutator_l1"} <= records[-1].keys()
    assert not any("commutator_mean" in r for r in read_jsonl(out / "none-s0" / "metrics.jsonl"))
    report_text = (out / "report.md").read_text()
    assert "## Inside the learned encodings" in report_text and "liere8_init=uniform-s0" in report_text
    path = inspect.main([str(out)])
    text = path.read_text()
    assert "| liere8_init=uniform-s0 | 1 | 0 |" in text and "none-s0" not in text
    for png in ("inspect_liere8_init=uniform-s0.png", "commutator_steps.png"):
        assert (out / png).stat().st_size > 0 and f"]({png})" in text
    single = inspect.main([str(out / "liere8_init=uniform-s0")])
    assert single is not None and single.parent == out / "liere8_init=uniform-s0"
    assert json.loads((out / "results.json").read_text())["runs"]


def test_bad_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="neither results.json"):
        inspect.write(tmp_path)


def test_commutator_is_set_against_extrapolation_run_by_run(tmp_path):
    records = [dict(kind="canvas", mode=m, factor=f, accuracy=a) for m, f, a in
               (("index", 1.0, 1.0), ("index", 2.0, 0.7), ("stretch", 2.0, 0.9), ("index", 1.5, 0.8))]  # fmt: skip
    (tmp_path / "evaluation.json").write_text(json.dumps({"extrapolate": records}))
    assert inspect.largest_factor_accuracies(tmp_path) == {"canvas 2x": 0.7}  # largest factor, index coordinates
    assert inspect.largest_factor_accuracies(tmp_path / "missing") == {}
    pairs = ((0.0, 0.9), (0.02, 0.6), (0.05, 0.5), (0.09, 0.2))
    per_run = [(f"r{i}", comm, {"canvas 2x": acc}) for i, (comm, acc) in enumerate(pairs)]
    table = inspect.correlation_table(per_run)
    assert "canvas 2x: rho -1.00 (p " in table and "4 runs" in table  # perfectly anti-ordered
    assert "| r3 | 0.09 | 20.0 |" in table
    assert inspect.correlation_table(per_run[:2]) is None and inspect.correlation_table([("r", 0.1, {})] * 3) is None
