"""The benchmark harnesses run at their tiniest size and produce complete, finite tables (no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import infer as infer_bench
from bench import ops as op_bench
from bench import scaling as scaling_bench
from bench import step as model_bench
from liere import Rotations, skew_expm


def assert_times(rows: list[dict], keys: tuple[str, ...]) -> None:
    for row in rows:
        for key in keys:
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)


def test_op_bench_rows_and_json(tmp_path) -> None:
    path = tmp_path / "ops.json"
    argv = ["--device", "cpu", "--size", "tiny", "--blocks", "2", "8", "--apply-blocks", "2", "8", "--repeats", "1"]
    argv += ["--dtypes", "fp32", "bf16"]
    results = op_bench.main([*argv, "--json", str(path)])
    saved = json.loads(path.read_text())  # the rows, plus the run's metadata (bench.common.run_metadata)
    assert {key: saved[key] for key in results} == json.loads(json.dumps(results))
    assert set(saved) - set(results) == {"command", "threads", "torch", "date", "load_average"}

    exp = results["exponential"]
    stacks = op_bench.stacks("tiny")
    expected = {
        (s.name, b, d, m) for s in stacks for b in (2, 8) for d in ("fp32", "bf16") for m in op_bench.exp_methods(s, b)
    }
    expected -= {(s.name, b, "bf16", "matrix_exp") for s in stacks for b in (2, 8)}
    assert any(m == "progression" for *_, m in expected)
    assert {(r["stack"], r["block"], r["dtype"], r["method"]) for r in exp} == expected
    assert_times(exp, ("fwd_ms", "fwdbwd_ms", "fwd_ratio", "fwdbwd_ratio"))
    for row in exp:
        assert 0 <= row["fwd_products"] <= row["fwdbwd_products"], row
        if row["method"] == "closed":
            assert row["fwdbwd_products"] == 0  # b = 2: cos/sin, no products
        if row["method"] == "matrix_exp":
            assert row["fwd_ratio"] == row["fwdbwd_ratio"] == 1
        if row["dtype"] == "fp32" and row["method"] not in ("exact", "matrix_exp"):  # these drift at paper norms
            assert row["orth_error"] <= 1e-5 and row["rel_error"] <= 1e-4, row

    app = results["application"]
    variants = {r["variant"] for r in app}
    assert {"Rotations.apply pairs", "Rotations.apply blocks b=8", "sdpa"} <= variants
    assert len(variants) == 4 and len(app) == 4 * len(op_bench.shapes("tiny"))
    assert_times(app, ("fwd_ms", "fwdbwd_ms", "fwd_ratio", "fwdbwd_ratio"))


@pytest.mark.slow
def test_model_bench_rows(tmp_path) -> None:
    path = tmp_path / "models.json"
    results = model_bench.main(["--size", "tiny", "--models", "ViT 32px/8", "--repeats", "1", "--json", str(path)])
    assert json.loads(path.read_text())["rows"] == results["rows"]
    rows = results["rows"]
    assert [r["encoding"] for r in rows] == list(model_bench.default_encodings(2))
    assert_times(rows, ("step_ms", "step_ratio"))
    assert all(r["peak_mib"] is None for r in rows)  # not measured on CPU
    assert_times(rows, ("saved_mib", "saved_ratio"))
    saved = {r["encoding"]: r["saved_mib"] for r in rows}
    assert saved["none"] < saved["axial-rope"] < saved["reference"]  # rotations, then per-sample dense ones
    lm = model_bench.main(["--size", "tiny", "--models", "char-LM", "--encodings", "reference", "--repeats", "1"])
    assert [r["encoding"] for r in lm["rows"]] == ["rope", "reference"]


def test_model_bench_memory_only_bf16_and_batch() -> None:
    argv = ["--size", "tiny", "--models", "char-LM", "--encodings", "liere64", "--memory-only", "--bf16"]
    small, large = (model_bench.main([*argv, "--batch", str(b)])["rows"] for b in (2, 4))
    for rows, batch in ((small, 2), (large, 4)):
        assert [(r["encoding"], r["step_ms"], r["model"].endswith(f"batch {batch}")) for r in rows] == [
            ("rope", None, True),
            ("liere64", None, True),
        ]
    # activations grow with the batch, the rotations do not: LieRE's excess over RoPE stays nearly the same
    excess = [rows[1]["saved_mib"] - rows[0]["saved_mib"] for rows in (small, large)]
    assert excess[0] > 0 and abs(excess[1] - excess[0]) < 0.15 * excess[0], excess
    assert large[0]["saved_mib"] > 1.5 * small[0]["saved_mib"]


def test_reference_rotations_apply_like_rotations() -> None:
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(1, 1, 3, 5, 1, 8, 8, generator=gen)
    blocks = skew_expm(M - M.mT)
    q = torch.randn(2, 3, 5, 8, generator=gen)
    expected = Rotations(8, blocks=blocks).apply(q)
    reference = model_bench.ReferenceRotations(8, blocks=blocks)
    torch.testing.assert_close(reference.apply(q), expected)
    torch.testing.assert_close(reference.with_prefix(1).apply(torch.cat([q[:, :, :1], q], 2))[:, :, 1:], expected)


@pytest.mark.slow
def test_model_bench_peak_fit_depth_and_3d() -> None:
    """``--peak`` measures a fresh process's first-step peak rise; ``--fit`` gives one line per encoding with the
    ratios it predicts; ``--depth`` and the 3D setting of ``--size small`` build."""
    argv = ["--size", "tiny", "--models", "ViT 32px/8", "--encodings", "liere64", "--memory-only", "--peak"]
    rows = model_bench.main(argv)["rows"]
    assert [r["encoding"] for r in rows] == ["axial-rope", "liere64"]
    assert_times(rows, ("peak_rise_mib", "peak_rise_ratio"))
    argv = ["--size", "tiny", "--models", "char-LM", "--encodings", "liere8", "--repeats", "1", "--depth", "1"]
    fit = model_bench.main([*argv, "--fit", "1", "2", "3", "--check-batch", "4"])["rows"]
    assert [r["encoding"] for r in fit] == ["rope", "liere8"]
    assert_times(fit, ("small_ratio", "check_ratio"))
    keys = ("fixed_ms", "per_sample_ms", "residual", "predicted_ratio", "check_predicted_ratio", "check_error")
    assert all(math.isfinite(r[k]) for r in fit for k in keys)  # a noisy machine may give any slope sign
    assert fit[0]["predicted_ratio"] == fit[0]["check_ratio"] == 1 and fit[0]["real_batch"] == 4
    argv = ["--size", "small", "--models", "3D", "--encodings", "liere8", "--memory-only", "--depth", "1"]
    small = model_bench.main([*argv, "--batch", "1"])["rows"]
    assert [r["encoding"] for r in small] == ["axial-rope", "liere8"] and small[1]["saved_ratio"] > 1


def test_model_bench_fit_line_and_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    a, b, residual = model_bench.fit_line([1, 2, 4], [3.0, 5.0, 9.0])
    assert (a, b) == pytest.approx((1.0, 2.0)) and residual == pytest.approx(0.0, abs=1e-12)
    for argv, error in [(["--fit", "2", "2"], "two distinct"), (["--check-batch", "4"], "needs --fit")]:
        with pytest.raises(SystemExit):
            model_bench.parse_args(argv)
        assert error in capsys.readouterr().err


def test_scaling_bench_rows() -> None:
    rows = scaling_bench.main(["--size", "tiny", "--repeats", "1", "--grids", "4x4"])["rows"]
    assert [r["encoding"] for r in rows] == ["axial-rope", "liere8", "liere64"]
    assert_times(rows, ("encoding_ms", "application_ms", "total_ms", "ratio"))
    assert rows[0]["ratio"] == 1 and {r["dominant"] for r in rows} <= {"encoding", "application"}


def test_every_step_and_scaling_option_has_help() -> None:
    for module in (model_bench, scaling_bench):
        actions = module.build_parser()._actions
        assert all(a.help for a in actions), [a.option_strings for a in actions if not a.help]


def test_product_counter_counts_every_product_forward_and_backward() -> None:
    x = torch.randn(6, 8, 8)
    # R = (x @ x) @ x: 2 products forward; backward: 2 per product
    assert op_bench.products_per_rotation(lambda a: a @ a @ a, x, backward=False) == 2
    assert op_bench.products_per_rotation(lambda a: a @ a @ a, x, backward=True) == 6
    # baddbmm counts; a product of a 8 x 16 by a 16 x 8 matrix is two 8 x 8 products' flops
    assert op_bench.products_per_rotation(lambda a: torch.baddbmm(a, a, a), x, backward=False) == 1
    wide = torch.randn(6, 8, 16)
    assert op_bench.products_per_rotation(lambda a: (a @ wide) @ wide.mT, x, backward=False) == 2 + 2
    # skew_expm's Taylor + squaring + polish: 5 products at small norm, one more per squaring
    A = torch.randn(10, 8, 8)
    A = (A - A.mT) / 100
    count = op_bench.products_per_rotation
    assert count(lambda a: skew_expm(a, "taylor_cans"), A, backward=False) == 5
    assert count(lambda a: skew_expm(a, "taylor_cans"), A, backward=True) == 15
    # larger norm: s squarings and one CANS polish (2 products), which the backward goes straight through
    fwd, total = (count(lambda a: skew_expm(a, "taylor_cans"), A * 2**12, backward=bwd) for bwd in (False, True))
    assert fwd > 5 + 2 and total - fwd == 2 * (fwd - 2)


def test_matrix_exp_products_follow_its_degree_choice() -> None:
    eye = torch.eye(4)
    A = torch.stack([0 * eye, 0.01 * eye, 0.3 * eye, 1.0 * eye, 3.0 * eye, 48.0 * eye])
    # 1-norms 0, 0.01, 0.3, 1, 3, 48: Taylor degrees 1, 4, 8, 12, 18 (5 products), 18 + 4 squarings
    assert op_bench.matrix_exp_products(A).tolist() == [0, 2, 3, 4, 5, 9]


CACHES = ("on", "cold", "off")


@pytest.mark.slow  # compiles and exports every tiny model
def test_infer_bench_rows_and_json(tmp_path) -> None:
    path = tmp_path / "infer.json"
    results = infer_bench.main(["--size", "tiny", "--repeats", "1", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))
    assert {"command", "device", "threads", "torch", "date"} <= set(results) and results["threads"] == 1
    encodings = [infer_bench.VIT_BASELINE, *infer_bench.ENCODINGS]
    vit = results["vit"]
    batches = infer_bench.SIZES["tiny"]["batches"]
    serving = [mode for mode in infer_bench.SERVING if mode[1] != "onnxruntime" or infer_bench.onnx_installed()]
    modes = [(c, "eager") for c in CACHES] + serving
    assert [(r["encoding"], r["cache"], r["runtime"]) for r in vit] == [
        (e, c, runtime) for _ in batches for c, runtime in modes for e in encodings
    ]
    assert_times(vit, ("ms", "ratio"))
    lm = results["decoding"]
    lm_encodings = [infer_bench.LM_BASELINE, *infer_bench.ENCODINGS]
    assert [(r["encoding"], r["cache"]) for r in lm] == [(e, c) for c in ("on", "off") for e in lm_encodings]
    assert_times(lm, ("tok_s", "ratio"))
    assert all(r["ratio"] == 1 for r in vit + lm if r["encoding"] in ("axial-rope", "rope"))
