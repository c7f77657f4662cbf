"""Loading someone else's run folder runs no code: checkpoints name models from an allow-list, run folders
reference only files inside themselves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from models.registry import LEGACY_CLASSES, MODELS, ModelSpecError, build_model, check_spec
from train import checkpoint, data
from train import run_dir as layout
from train.__main__ import main as train_main
from train.ab import evaluate, inspect, report
from train.ab import runner as ab
from train.summaries import AbResults

RUN = "liere8-s0"


@pytest.fixture(scope="module")
def ab_folder(tmp_path_factory) -> Path:
    """A finished smoke A/B folder with one liere8 run (results.json, summary.json, last.pt)."""
    out = tmp_path_factory.mktemp("sec") / "ab"
    args = ["--preset", "smoke", "--task", "digits", "--encodings", "liere8", "--steps", "10", "--evaluate", "none"]
    ab.main([*args, "--seeds", "0", "--quiet", "--jobs", "1", "--out", str(out)])
    return out


def _tamper(path: Path, spec: dict) -> None:
    """Put ``spec`` into the checkpoint at ``path`` and recompute its checksum, as an attacker would."""
    state = torch.load(path, weights_only=True)
    state["model_spec"] = spec
    state["checksum"] = checkpoint.checksum(state)
    torch.save(state, path)


def _copy(src: Path, dst: Path) -> Path:
    """A copy of a file or a folder."""
    shutil.copytree(src, dst) if src.is_dir() else shutil.copyfile(src, dst)
    return dst


@pytest.mark.slow
def test_crafted_checkpoint_is_refused_by_every_command_and_runs_nothing(
    ab_folder, tmp_path, python_module, failing_command
):
    folder = _copy(ab_folder, tmp_path / "ab")
    marker = tmp_path / "pwned"
    _tamper(folder / RUN / layout.LAST, {"class": "subprocess.run", "kwargs": {"args": ["touch", str(marker)]}})
    run = folder / RUN
    resume = ["--task", "digits", "--preset", "smoke", "--steps", "10", "--out", run, "--resume"]
    done = [python_module("train.ab.evaluate", folder)]  # the reproduction, as a command
    done += [failing_command(evaluate.main, run), failing_command(inspect.main, run)]
    done += [failing_command(report.main, folder), failing_command(train_main, *resume)]
    for command in done:
        assert command.returncode == 2, command
        assert command.stderr.startswith("error: ") and command.stderr.strip().count("\n") == 0, command.stderr
        assert "refused model class 'subprocess.run'" in command.stderr and "last.pt" in command.stderr
        assert "[data]" not in command.stdout  # refused before the data set loads
    assert not marker.exists()


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"class": "os.system", "kwargs": {"command": "touch {marker}"}}, "refused model class 'os.system'"),
        ({"model": "subprocess.run", "kwargs": {"args": ["touch", "{marker}"]}}, "refused model 'subprocess.run'"),
        ({"model": "models.vit.ViT", "kwargs": {}}, "refused model 'models.vit.ViT'"),
        ({"kwargs": {}}, "a model spec needs 'model'"),
    ],
)
def test_unregistered_models_are_refused_before_anything_is_called(ab_folder, tmp_path, spec, needle):
    marker = tmp_path / "pwned"
    path = tmp_path / layout.LAST
    _copy(ab_folder / RUN / layout.LAST, path)
    _tamper(path, json.loads(json.dumps(spec).replace("{marker}", str(marker))))
    for load in (checkpoint.read, checkpoint.load_model):
        with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint {path}: {needle}"):
            load(path)
    assert not marker.exists()


def _spec(ab_folder: Path) -> dict:
    return checkpoint.read(ab_folder / RUN / layout.LAST)["model_spec"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"args": ["touch", "x"]}, r"refused unknown arguments \['args'\]"),
        ({"num_classes": torch.tensor(10)}, r"refused arguments \['num_classes'\]: values must be plain data"),
        ({"encoding_options": {"theta": torch.ones(1)}}, r"refused arguments \['encoding_options'\]"),
    ],
)
def test_registered_model_with_bad_arguments_is_refused(ab_folder, tmp_path, change, needle):
    spec = _spec(ab_folder)
    path = _copy(ab_folder / RUN / layout.LAST, tmp_path / layout.LAST)
    _tamper(path, spec | {"kwargs": spec["kwargs"] | change})
    with pytest.raises(checkpoint.CheckpointError, match=f"{path}: model 'vit': {needle}"):
        checkpoint.read(path)
    missing = {k: v for k, v in spec["kwargs"].items() if k != "num_classes"}
    with pytest.raises(ModelSpecError, match=r"missing arguments \['num_classes'\]"):
        check_spec({"model": "vit", "kwargs": missing})


def test_new_specs_name_registered_models_and_old_class_paths_still_load(ab_folder, tmp_path):
    spec = _spec(ab_folder)
    assert spec["model"] == "vit" and set(spec) == {"model", "kwargs"}
    assert set(LEGACY_CLASSES.values()) == set(MODELS)
    path = _copy(ab_folder / RUN / layout.LAST, tmp_path / layout.LAST)
    _tamper(path, {"class": "models.vit.ViT", "kwargs": spec["kwargs"]})  # as written before the registry
    old, new = checkpoint.load_model(path), checkpoint.load_model(ab_folder / RUN / layout.LAST)
    assert type(old) is MODELS["vit"]
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    torch.manual_seed(0)
    fresh = build_model({"model": "charlm", "kwargs": {"vocab_size": 5, "context": 8, "dim": 16, "heads": 1}})
    assert type(fresh) is MODELS["charlm"]


# ---------------------------------------------------------------- run folders reference only their own files


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("run_dir", "../elsewhere", "must name a folder inside the A/B folder"),
        ("run_dir", "/tmp", "must name a folder inside the A/B folder"),
        ("run_dir", "..", "must name a folder inside the A/B folder"),
        ("checkpoint", "../../x/last.pt", "must be a file inside its run folder"),
        ("metrics_log", "/etc/passwd", "must be a file inside its run folder"),
    ],
)
def test_results_pointing_outside_the_folder_are_refused(ab_folder, tmp_path, field, value, needle, failing_command):
    folder = _copy(ab_folder, tmp_path / "ab")
    outside = _copy(ab_folder / RUN, tmp_path / "elsewhere")  # a real run the tampered results point at
    (outside / layout.EVALUATION).unlink()
    results = json.loads((folder / layout.RESULTS_JSON).read_text())
    results["runs"][0][field] = value
    (folder / layout.RESULTS_JSON).write_text(json.dumps(results))
    with pytest.raises(layout.RunFolderError, match=needle):
        AbResults.load(folder)
    done = failing_command(evaluate.main, folder)
    assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr
    assert not (outside / layout.EVALUATION).exists()


def test_run_folder_linked_out_of_the_ab_folder_is_refused(ab_folder, tmp_path):
    folder = _copy(ab_folder, tmp_path / "ab")
    outside = tmp_path / "elsewhere"
    (folder / RUN).rename(outside)
    (outside / layout.EVALUATION).unlink()
    (folder / RUN).symlink_to(outside)
    with pytest.raises(layout.RunFolderError, match=f"run folder '{RUN}' is a link out of"):
        evaluate.main([str(folder), "--evaluate", "none"])
    assert not (outside / layout.EVALUATION).exists()


# ---------------------------------------------------------------- other stored data that reaches calls


def test_stored_configs_and_logs_are_checked_as_data(ab_folder, tmp_path):
    run = _copy(ab_folder / RUN, tmp_path / "run")
    summary = json.loads((run / layout.SUMMARY).read_text())
    summary["config"]["__class__"] = "os.system"
    (run / layout.SUMMARY).write_text(json.dumps(summary))
    with pytest.raises(layout.RunFolderError, match=r"summary\.json: unknown run config fields \['__class__'\]"):
        evaluate.main([str(run)])
    with pytest.raises(ValueError, match=r"dataset 'text:/etc/hostname': unknown data options \['path'\]"):
        data.load_dataset("text:/etc/hostname", path="/etc/passwd")  # a stored data option cannot pick a file
    (run / layout.METRICS).write_text('{"step": 5}\n["step", 10]\n{"step": 15}\n')
    with pytest.raises(layout.RunFolderError, match=r"metrics\.jsonl, line 2 is not a metrics record"):
        layout.read_jsonl(run / layout.METRICS)
    assert not layout.alive(2**70)  # a lock file naming an impossible pid


def _stride0(elements: int) -> torch.Tensor:
    """A tensor of ``elements`` values over one stored float: a few bytes on disk, 4 * elements once copied."""
    return torch.zeros(1).expand(elements)


def test_small_files_describing_huge_tensors_are_refused(ab_folder, tmp_path, failing_command):
    folder = _copy(ab_folder, tmp_path / "ab")
    last = folder / RUN / layout.LAST
    state = torch.load(last, weights_only=True)
    key = next(k for k in state["model"] if k.endswith("_extra_state"))
    state["model"][key] = _stride0(2**33)  # refused before its checksum is computed (which would copy it)
    torch.save(state, last)
    for command in (failing_command(evaluate.main, folder / RUN), failing_command(inspect.main, folder / RUN)):
        assert command.returncode == 2 and command.stderr.count("\n") == 1, command.stderr
        assert f"{last} holds a tensor of shape (8589934592,)" in command.stderr
    correct = folder / RUN / layout.CORRECT
    torch.save(_stride0(2**33), correct)  # a 1.6 kB file, read by the report's McNemar test
    with pytest.raises(layout.RunFolderError, match=f"{correct} is not a per-example correctness file: .* holds a"):
        report._correctness(correct)


def test_json_files_are_bounded_in_size_and_depth(tmp_path):
    deep = tmp_path / "results.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(layout.RunFolderError, match="results.json is nested too deeply"):
        layout.read_json(deep)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(layout.RunFolderError, match="metrics.jsonl is nested too deeply"):
        layout.read_jsonl(metrics)
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(16 * 2**30)  # 16 GiB, sparse: refused by its size, never read
    for read in (layout.read_json, layout.read_jsonl):
        with pytest.raises(layout.RunFolderError, match=r"big\.json is 17179869184 bytes, more than"):
            read(big)


def test_no_write_follows_a_symlink_out_of_the_run_folder(ab_folder, tmp_path):
    folder = _copy(ab_folder, tmp_path / "ab")
    outside = {name: tmp_path / f"outside-{name}" for name in (layout.CORRECT, inspect.OUTPUT, layout.METRICS)}
    for name, target in outside.items():
        target.write_text("precious")
        (folder / RUN / name).unlink(missing_ok=True)
        (folder / RUN / name).symlink_to(target)
    (folder / inspect.OUTPUT).symlink_to(outside[inspect.OUTPUT])
    evaluate.main([str(folder / RUN)])
    inspect.main([str(folder)])
    with pytest.raises(layout.RunFolderError, match="metrics.jsonl is a symbolic link"):
        layout.append_text(folder / RUN / layout.METRICS, "{}\n")
    assert all(target.read_text() == "precious" for target in outside.values())
    assert not (folder / RUN / layout.CORRECT).is_symlink()  # replaced by the new file
