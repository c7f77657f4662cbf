"""train.ab.report: report.md from an A/B folder (CIs, paired tests, evaluations, fractions, plots); evaluate CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from train.ab import evaluate, report
from train.ab import runner as ab
from train.data import text as text_source

ARGS = ["--preset", "smoke", "--steps", "10", "--seeds", "0,1", "--quiet", "--jobs", "1"]


def linked_pngs(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ab") / "digits"
    ab.main([*ARGS, "--task", "digits", "--encodings", "none,liere8", "--data-fractions", "0.5,1", "--out", str(out)])
    return out


@pytest.mark.slow
def test_report_has_tables_paired_tests_and_existing_plots(vision_run):
    text = (vision_run / "report.md").read_text()
    for needle in ("Δ vs ref", "p (seeds)", "p (McNemar)", "[95% CI]", "## Patch-shuffle diagnostic",
                   "## Resolution extrapolation: resized test images", "## Data-fraction ablation",
                   "preset `smoke`", "sklearn:load_digits"):  # fmt: skip
        assert needle in text, needle
    links = linked_pngs(text)
    assert {"final.png", "curves.png", "shuffle.png", "extrapolate_resize.png", "fractions.png"} <= set(links)
    assert all((vision_run / link).stat().st_size > 0 for link in links)
    results = json.loads((vision_run / "results.json").read_text())
    assert results["fractions"] == [0.5, 1.0] and len(results["runs"]) == 8
    for row in results["summary"]:
        assert row["seeds"] == [0, 1] and len(row["values"]) == 2 and row["low"] <= row["mean"] <= row["high"]
        if row["encoding"] != row["reference"]:
            assert 0 < row["p_seeds"] <= 1 and 0 < row["p_mcnemar"] <= 1
    assert all(r["reference"] == "none" for r in results["summary"])  # no axial-rope: the first encoding
    assert results["data_sizes"] == {"train": 1439, "val": 179, "test": 179} and results["data_unit"] == "images"
    assert results["scored"] == {"test": 179} and "- splits: train 1439 / val 179 / test 179 images;" in text
    correct = torch.load(vision_run / "liere8-s0" / report.CORRECT_FILE, weights_only=True)
    run = next(r for r in results["runs"] if r["run_dir"] == "liere8-s0")
    assert correct.dtype == torch.bool and correct.float().mean().item() == pytest.approx(run["test"]["accuracy"])
    assert not (vision_run / "liere8-f0.5-s0" / report.EVALUATION_FILE).exists()  # evaluations: main fraction only


def test_default_reference_is_a_fixed_baseline():
    assert report.default_reference("digits", ["none", "liere8", "axial-rope"]) == "axial-rope"
    assert report.default_reference("pydoc", ["liere8", "rope", "axial-rope"]) == "rope"
    assert report.default_reference("digits", ["liere8", "rope-mixed"]) == "liere8"  # no baseline: the first
    assert report.resolve_reference("digits", ["liere8", "rope-mixed"], "rope-mixed") == "rope-mixed"
    with pytest.raises(ValueError, match=r"--reference: 'rope' is not one of the encodings \['liere8'\]"):
        report.resolve_reference("pydoc", ["liere8"], "rope")


def test_extrapolation_is_paired_with_the_reference_seed_by_seed():
    def evaluation(seed, *accuracies):
        records = [
            dict(kind="canvas", mode="index", factor=f, accuracy=a) for f, a in zip((1.0, 2.0), accuracies, strict=True)
        ]
        return {"seed": seed, "extrapolate": records}

    evals = {
        "rope-mixed": [evaluation(s, 1.0, a) for s, a in zip(range(5), (0.5, 0.4, 0.6, 0.3, 0.5), strict=True)],
        "liere8": [
            evaluation(s, 1.0, a) for s, a in zip((4, 3, 2, 1, 0), (0.9, 0.2, 0.7, 0.8, 0.6), strict=True)
        ],  # any order
    }
    table = report.paired_extrapolation_table(evals, "canvas", "rope-mixed", [1.0, 2.0], ["1x", "2x"])
    row = next(line for line in table.splitlines() if line.startswith("| liere8 | index |"))
    # seed by seed at 2x: 0.6-0.5, 0.8-0.4, 0.7-0.6, 0.2-0.3, 0.9-0.5 -> mean +18 points, 4 of 5 higher;
    # sign flips with |sum| >= 0.9: none, or one of the three 0.1s, either overall sign: 8 of 32
    assert "| +0.0 (0/5 higher, p 1) |" in row and "+18.0 (4/5 higher, p 0.25) |" in row
    assert "rope-mixed |" not in table.split("\n\n")[1]  # no row for the reference itself


@pytest.mark.slow
def test_evaluate_cli_recomputes_from_checkpoints_and_reference(vision_run):
    for run in ("none-s0", "none-s1", "liere8-s0", "liere8-s1"):
        (vision_run / run / report.EVALUATION_FILE).unlink()
    evaluate.main([str(vision_run), "--evaluate", "shuffle", "--reference", "none"])
    saved = json.loads((vision_run / "none-s1" / report.EVALUATION_FILE).read_text())
    assert set(saved) == {"shuffle"} and saved["shuffle"]["drop"] == 0  # no positions: shuffling changes nothing
    text = (vision_run / "report.md").read_text()
    assert re.search(r"^\| none \| [^\n]* \| ref \|", text, re.M)  # the chosen reference row
    assert "## Patch-shuffle" in text and "Resolution extrapolation" not in text
    with pytest.raises(ValueError, match="--reference"):
        report.write_report(vision_run, "rope")


@pytest.mark.slow
def test_text_run_reports_length_extrapolation(tmp_path):
    out = tmp_path / "lm"
    results = ab.main([*ARGS, "--seeds", "0", "--task", "pydoc", "--encodings", "liere8,rope", "--out", str(out)])
    text = (out / "report.md").read_text()
    assert "## Length extrapolation" in text and "4x (128-token windows, 1024 tokens)" in text
    assert re.search(r"^\| rope \| [^\n]* \| ref \|", text, re.M) and "p (McNemar)" in text  # default: rope
    # the main table's test bpc scores the first eval_samples (256) test tokens, the 1x column 1024
    assert results.scored == {"test": 256, "length": {"1": 1024, "2": 1024, "4": 1024}}
    assert "the main table's test bpc scores 256 tokens" in text and "which scores 1024" in text
    assert results.data_unit == "chars" and sum(results.data_sizes.values()) == len(text_source.pydoc_text())
    assert f"test {results.data_sizes['test']} characters (one token each)" in text
    assert all((out / link).is_file() for link in linked_pngs(text)) and "length.png" in linked_pngs(text)
    records = json.loads((out / "rope-s0" / report.EVALUATION_FILE).read_text())["length"]
    assert [r["multiple"] for r in records] == [1, 2, 4]


def test_extension_section_pairs_each_method_with_none(tmp_path):
    def run(seed: int) -> dict:
        records = []
        for method, slope in (("none", 0.3), ("yarn", 0.1)):
            records += [{"method": method, "multiple": m, "length": 8 * m, "bpc": 2 + slope * m + 0.01 * seed}
                        for m in (1, 2, 4)]  # fmt: skip
        return {"extension": records, "seed": seed}

    text = report.extension_section({"rope": [run(s) for s in range(4)]}, tmp_path)
    assert "## Test-time extension" in text and "| rope | yarn |" in text and "4x context" in text
    assert "(p 0.125)" in text  # 4 seeds, all better: the smallest two-sided sign-flip p-value, 2 / 2^4
    assert (tmp_path / "extension.png").stat().st_size > 0
