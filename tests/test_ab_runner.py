"""A/B runner: smoke run writes table, results.json, plots and reloadable checkpoints; bad specs fail early."""

from __future__ import annotations

import json

import pytest

from train.ab import runner as ab
from train.checkpoint import load_model

ARGS = ["--preset", "smoke", "--task", "digits", "--seeds", "0", "--quiet", "--jobs", "1"]


@pytest.mark.slow
def test_smoke_run_writes_results(tmp_path, capsys):
    out = tmp_path / "ab"
    ab.main([*ARGS, "--encodings", "none,liere8", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| none |" in printed and "| liere8 |" in printed and "sklearn" in printed  # table and data source
    for name in ("results.json", "results.md", "curves.png", "final.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["encodings"] == ["none", "liere8"] and saved["seeds"] == [0]
    assert {"data_source", "device", "torch_version", "wall_time_s", "runs", "summary", "table"} <= saved.keys()
    assert [r["step_time_ratio"] for r in saved["summary"]][0] == 1.0
    for run in saved["runs"]:
        assert run["config"]["encoding"] == run["encoding"] and "accuracy" in run["test"]
        model = load_model(out / run["checkpoint"])  # enough is stored to rebuild every run's model
        assert sum(p.numel() for p in model.parameters()) == run["params"]
        assert (out / run["metrics_log"]).is_file()

    # --resume skips finished runs: same numbers, no retraining
    summary_file = out / saved["runs"][0]["run_dir"] / "summary.json"
    mtime = summary_file.stat().st_mtime_ns
    again = ab.main([*ARGS, "--encodings", "none,liere8", "--out", str(out), "--resume"])
    assert summary_file.stat().st_mtime_ns == mtime
    assert [r.test for r in again.runs] == [r["test"] for r in saved["runs"]]


@pytest.mark.slow
def test_parallel_runs_equal_sequential_runs_bit_for_bit(tmp_path, capsys):
    args = [*ARGS[:-2], "--seeds", "0,1", "--encodings", "none,liere8", "--evaluate", "shuffle", "--threads", "1"]
    sequential = ab.main([*args, "--jobs", "1", "--out", str(tmp_path / "one")])
    parallel = ab.main([*args, "--jobs", "2", "--out", str(tmp_path / "two")])
    assert "runs at once: 2, threads per run: 1" in capsys.readouterr().out
    assert parallel.jobs == 2 and parallel.threads == sequential.threads == 1
    assert [(r.encoding, r.seed) for r in parallel.runs] == [(r.encoding, r.seed) for r in sequential.runs]
    assert [r.state_sha256 for r in parallel.runs] == [r.state_sha256 for r in sequential.runs]
    assert [r.test for r in parallel.runs] == [r.test for r in sequential.runs]
    for run in parallel.runs:  # the evaluations ran in the worker processes too
        assert (tmp_path / "two" / run.run_dir / "evaluation.json").is_file()


def test_unknown_encoding_fails_before_training(tmp_path):
    out = tmp_path / "ab"
    with pytest.raises(ValueError, match="bogus9"):
        ab.main([*ARGS, "--encodings", "none,bogus9", "--out", str(out)])
    assert not out.exists() or not any(out.iterdir())


def test_unit_suffix_trains_on_unit_coords(tmp_path):
    assert ab.split_encoding("liere8:init=uniform@unit") == ("liere8:init=uniform", {"unit_coords": True})
    assert ab.split_encoding("liere8") == ("liere8", {})
    with pytest.raises(ValueError, match="@unit"):
        ab.split_encoding("liere8@half")
    results = ab.main([*ARGS, "--encodings", "liere8@unit", "--evaluate", "none", "--out", str(tmp_path / "ab")])
    (run,) = results.runs
    assert run.encoding == "liere8@unit" and run.config["encoding"] == "liere8"
    assert run.model_spec["kwargs"]["unit_coords"] is True


def test_spec_with_two_options_is_one_encoding(tmp_path):
    encodings = "none,liere8:init=uniform,rot_dim=8"
    results = ab.main([*ARGS, "--encodings", encodings, "--evaluate", "none", "--out", str(tmp_path / "ab")])
    assert [run.config["encoding"] for run in results.runs] == ["none", "liere8:init=uniform,rot_dim=8"]
    assert ab.default_encodings("digits") == ["none", "abs", "axial-rope", "rope-mixed", "liere8", "liere64"]


def test_parse_seeds():
    assert ab.parse_seeds("0,1,2") == [0, 1, 2] == ab.parse_seeds("0-2")
    assert ab.parse_seeds("7") == [7]
    with pytest.raises(ValueError, match="--seeds"):
        ab.parse_seeds("a,b")


def _image_folder(root, size: int = 32, per_class: int = 8):
    from PIL import Image

    for label, color in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), color).save(root / label / f"{i}.png")
    return root


def test_folder_image_size_and_split_fractions_reach_the_run(tmp_path):
    folder = _image_folder(tmp_path / "images")
    args = ["--task", f"folder:{folder}", "--image-size", "32", "--split-fractions", "0.5,0.25,0.25"]
    args += ["--preset", "smoke", "--steps", "2", "--encodings", "axial-rope", "--evaluate", "none", "--quiet"]
    results = ab.main([*args, "--jobs", "1", "--out", str(tmp_path / "ab")])
    (run,) = results.runs
    assert run.config["data_options"] == {"image_size": 32, "fractions": (0.5, 0.25, 0.25)}
    assert run.model_spec["kwargs"]["image_shape"] == [3, 32, 32]  # not upscaled to the default 64 px
    assert results.data_sizes == {"train": 8, "val": 4, "test": 4} and results.data_unit == "images"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "pydoc", "--image-size", "32"], r"--image-size: dataset 'pydoc' has no such option"),
        (["--task", "cifar10", "--split-fractions", "0.8,0.1,0.1"], "--split-fractions: dataset 'cifar10' has no"),
        (["--task", "digits", "--split-fractions", "0.8,0.1"], "--split-fractions: expected train,val,test"),
        (["--task", "digits", "--split-fractions", "0.8,0.3,0.1"], "summing to 1"),
        (["--task", "folder:/x", "--image-size", "0"], "--image-size must be a positive int"),
    ],
)
def test_data_options_refused_where_they_do_not_apply(tmp_path, extra, message):
    from train.__main__ import main as train_main

    with pytest.raises(ValueError, match=message):
        ab.main([*ARGS, *extra, "--out", str(tmp_path / "ab")])
    with pytest.raises(ValueError, match=message):
        train_main(["--preset", "smoke", *extra, "--out", str(tmp_path / "one")])
    assert not (tmp_path / "ab").exists() and not (tmp_path / "one").exists()
