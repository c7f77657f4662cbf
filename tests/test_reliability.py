"""A run that goes wrong says so, and nothing is lost or silently corrupted.

Divergence stops (or skips) with the step, the loss and the last good checkpoint; whole files are written
atomically and torn log lines are dropped on resume; checkpoints carry a checksum and a corrupt ``last.pt``
falls back to ``prev.pt``; a run folder is locked; logs stay true across resumes; CLIs fail in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import checkpoint, machine, progress
from train import run_dir as layout
from train.ab import report
from train.ab import runner as ab
from train.loop import Diverged, train
from train.presets import preset_config
from train.summaries import AbResults, RunSummary

REPO = Path(__file__).resolve().parents[1]


def _config(**changes):
    base = dict(encoding="rope-mixed", steps=30, ckpt_every=10, eval_every=30, device="cpu")
    return preset_config("smoke", "digits", **(base | changes))


class Crash(Exception):
    """Raised by a hook to stop a run mid-way, as a crash would (checkpoints so far stay)."""


def ctrl_c(config, step: int):
    """A hook pressing Ctrl-C at ``step`` of the liere8 run."""

    def hook(at: int, model) -> None:
        if config.encoding == "liere8" and at == step:
            raise KeyboardInterrupt

    return hook


def crash_at(step: int):
    def hook(at: int, model) -> None:
        if at == step:
            raise Crash(at)

    return hook


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("encoding", ["rope-mixed", "liere8"])
def test_divergence_stops_naming_step_loss_and_checkpoint(tmp_path, encoding):
    with pytest.raises(Diverged, match=r"diverged at step \d+: loss .* last good checkpoint: .*last\.pt \(step \d+\)"):
        train(_config(encoding=encoding, lr=1e3, ckpt_every=1, log_every=1), tmp_path, quiet=True)
    summary = RunSummary.load(tmp_path / layout.SUMMARY)
    step = summary.diverged["step"]
    assert summary.diverged["checkpoint_step"] == step - 1 == checkpoint.read(tmp_path / layout.LAST)["step"]
    assert summary.test == {} and summary.test_value is None
    assert summary.final_loss is None or torch.isfinite(torch.tensor(summary.final_loss))
    assert all(torch.isfinite(v).all() for v in checkpoint.load_model(tmp_path / layout.LAST).state_dict().values())
    records = layout.read_jsonl(tmp_path / layout.METRICS)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)  # no NaN logged


def test_nonfinite_steps_can_be_skipped_explicitly(tmp_path):
    summary = train(_config(lr=1e3), tmp_path, quiet=True, on_nonfinite="skip")
    skipped = [r for r in layout.read_jsonl(tmp_path / layout.METRICS) if r.get("skipped_nonfinite")]
    assert summary.skipped_steps == len(skipped) > 0 and summary.diverged is None
    assert all(torch.isfinite(v).all() for v in checkpoint.load_model(tmp_path / layout.LAST).state_dict().values())


def test_ab_table_marks_diverged_runs(tmp_path, capsys):
    out = tmp_path / "ab"
    args = ["--preset", "smoke", "--task", "digits", "--seeds", "0", "--quiet", "--out", str(out), "--evaluate", "none"]
    args += ["--jobs", "1"]
    results = ab.main([*args, "--lr", "1e3", "--encodings", "axial-rope,rope-mixed"])
    rows = [line for line in results.table.splitlines() if line.startswith(("| axial-rope |", "| rope-mixed |"))]
    assert len(rows) == 2 and all(" | diverged (s0) | — | — | — | — | " in row for row in rows)  # no accuracy
    saved = AbResults.load(out)
    assert any(r.diverged for r in saved.runs)
    assert "diverged" in (out / layout.REPORT).read_text()


# ---------------------------------------------------------------- files


def test_atomic_json_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    layout.write_json(path, {"a": 1})

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        layout.write_json(path, {"a": 2})
    assert layout.read_json(path) == {"a": 1} and list(tmp_path.iterdir()) == [path]  # no temp file left


def test_json_errors_name_the_file(tmp_path):
    (tmp_path / "summary.json").write_text("")
    with pytest.raises(layout.RunFolderError, match=r"summary\.json is empty"):
        RunSummary.load(tmp_path / "summary.json")
    (tmp_path / "results.json").write_text('{"task": "x"')
    with pytest.raises(layout.RunFolderError, match=r"results\.json is not valid JSON"):
        AbResults.load(tmp_path)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> tuple[Path, Path]:
    """A full run and one crashed after step 13 (checkpoints at 10; log every 4 steps, so the window straddles)."""
    root = tmp_path_factory.mktemp("crash")
    config = _config(log_every=4)
    train(config, root / "full", quiet=True)
    with pytest.raises(Crash):
        train(config, root / "crashed", quiet=True, hooks=[crash_at(13)])
    return root / "full", root / "crashed"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in layout.read_jsonl(run / layout.METRICS) if "loss" in r]


@pytest.mark.slow
def test_resume_logs_full_windows_and_accumulates_wall_time(crashed, tmp_path, capsys):
    full, run = crashed[0], _copy(crashed[1], tmp_path / "run")
    before = checkpoint.read(run / layout.LAST)["wall_time_s"]
    summary = train(_config(log_every=4), run, resume=True, quiet=True)
    assert "resuming" in (out := capsys.readouterr().out) and "from step 10 of 30" in out
    assert _losses(run) == _losses(full)  # the first log after the resume averages steps 9..12, as uninterrupted
    assert summary.state_sha256 == RunSummary.load(full / layout.SUMMARY).state_sha256
    assert before > 0 and summary.wall_time_s > before


def test_torn_metrics_line_is_dropped_on_resume(crashed, tmp_path, capsys):
    full, run = crashed[0], _copy(crashed[1], tmp_path / "run")
    with open(run / layout.METRICS, "a") as f:
        f.write('{"step": 14, "lo')  # a write cut by a kill or a full disk
    train(_config(log_every=4), run, resume=True, quiet=True)
    assert "torn last line" in capsys.readouterr().err
    assert _losses(run) == _losses(full)


def _flip_weight_byte(path: Path) -> None:
    """Flip one byte inside the stored bytes of the largest weight tensor (the zip container stays valid)."""
    state = torch.load(path, weights_only=True)
    name, tensor = max(state["model"].items(), key=lambda kv: kv[1].numel())
    raw, data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), bytearray(path.read_bytes())
    at = data.find(raw[:64]) + 100
    assert at > 100, name
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_last_checkpoint_falls_back_to_verified_prev(crashed, tmp_path, capsys):
    full, run = crashed
    run = _copy(run, tmp_path / "run")
    assert checkpoint.read(run / layout.LAST)["step"] == 10 and not (run / layout.PREV).exists()
    with pytest.raises(Crash):  # one more checkpoint (step 20) so that prev.pt (step 10) exists
        train(_config(log_every=4), run, resume=True, quiet=True, hooks=[crash_at(23)])
    _flip_weight_byte(run / layout.LAST)
    with pytest.raises(checkpoint.CheckpointError, match="checksum"):
        checkpoint.read(run / layout.LAST)
    (run / ".last.pt.99999.tmp").write_bytes(b"left by a killed write")
    summary = train(_config(log_every=4), run, resume=True, quiet=True)
    err = capsys.readouterr().err
    assert "last.pt is corrupt" in err and "resuming from" in err and "prev.pt (step 10)" in err
    assert summary.state_sha256 == RunSummary.load(full / layout.SUMMARY).state_sha256  # bitwise as uninterrupted
    assert (run / "last.pt.corrupt").is_file() and not (run / ".last.pt.99999.tmp").exists()


def test_no_usable_checkpoint_names_each_file_and_claims_nothing(crashed, tmp_path):
    run = _copy(crashed[1], tmp_path / "run")  # last.pt only
    (run / layout.LAST).write_bytes((run / layout.LAST).read_bytes()[:1000])
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(checkpoint.CheckpointError, match=r"last\.pt is unreadable") as err:
        train(_config(log_every=4), run, resume=True, quiet=True)
    assert "prev.pt" not in str(err.value)  # no hint at a prev.pt that does not exist
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


# ---------------------------------------------------------------- folder


def test_run_folder_lock_refuses_a_second_run_and_frees_a_dead_ones(tmp_path):
    with layout.RunLock(tmp_path), pytest.raises(layout.RunFolderError, match=r"in use by process \d+"):
        train(_config(), tmp_path, quiet=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / layout.LOCK).write_text(f"{socket.gethostname()} {dead.stdout.strip()}\n")
    assert train(_config(steps=5), tmp_path, quiet=True).steps == 5  # taken over
    assert not (tmp_path / layout.LOCK).exists()


@pytest.mark.slow
def test_fresh_run_into_a_used_folder_is_refused_before_loading_data(tmp_path):
    (tmp_path / layout.METRICS).write_text('{"step": 1}\n')
    done = _cli("train", "--task", "digits", "--preset", "smoke", "--out", str(tmp_path), "--device", "cpu")
    assert done.returncode == 2 and "[data]" not in done.stdout
    assert done.stderr.strip().count("\n") == 0 and "--resume" in done.stderr and "Traceback" not in done.stderr


def test_fresh_ab_into_a_used_folder_is_refused_before_loading_data(tmp_path, capsys):
    (tmp_path / "none-s0").mkdir()
    (tmp_path / "none-s0" / layout.LAST).write_bytes(b"")
    with pytest.raises(FileExistsError, match="--resume"):
        ab.main(["--preset", "smoke", "--task", "digits", "--out", str(tmp_path), "--encodings", "none"])
    assert "[data]" not in capsys.readouterr().out


# ---------------------------------------------------------------- CLIs


def test_seeds_are_bounded():
    with pytest.raises(ValueError, match=r"--seeds: .* 100000001 seeds; at most 1000"):
        ab.parse_seeds("0-100000000")
    with pytest.raises(ValueError, match="upwards"):
        ab.parse_seeds("5-2")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "args", "needle"),
    [
        ("train", ["--out", "{tmp}/x", "--steps", "0", "--task", "digits"], "steps"),
        ("train.ab", ["--seeds", "0-100000000", "--out", "{tmp}/ab"], "--seeds"),
        ("train.ab.report", ["{tmp}"], "results.json"),
        ("train.ab.report", ["{tmp}/missing"], "not a folder"),
        ("train.ab.evaluate", ["{tmp}"], "holds no last.pt"),
    ],
)
def test_cli_usage_errors_are_one_line_with_exit_code_2(tmp_path, module, args, needle):
    done = _cli(module, *(a.format(tmp=tmp_path) for a in args))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and needle in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


def test_report_on_results_without_runs_says_so(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"task": "arrow"}))
    with pytest.raises(layout.RunFolderError, match=r"results\.json is missing \['encodings'"):
        report.write_report(tmp_path)


def test_threads_and_cpu_are_chosen_and_recorded(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(machine, "cpu_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.1, 1.0, 1.0))
    assert machine.choose_threads("auto")[0] == 1  # another busy process on 2 cores: one thread
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert machine.choose_threads("auto")[0] == 2
    assert machine.choose_threads("3") == (3, "--threads")
    with pytest.raises(ValueError, match="--threads"):
        machine.choose_threads("0")
    assert machine.cpu_model()


def test_jobs_default_to_one_single_thread_run_per_idle_core(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(machine, "cpu_cores", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))  # 3 idle cores
    assert machine.plan_jobs("auto", "auto", runs=6)[:2] == (3, 1)
    assert machine.plan_jobs("auto", "auto", runs=2)[:2] == (2, 1)  # no more processes than runs
    assert machine.plan_jobs("auto", "3", runs=6)[:2] == (1, 3)  # explicit threads are kept
    assert machine.plan_jobs("2", "auto", runs=6)[:2] == (2, 1)  # explicit jobs share the idle cores
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert machine.plan_jobs("2", "auto", runs=6)[:2] == (2, 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert machine.plan_jobs("auto", "auto", runs=6)[:2] == (2, 2)
    assert "runs at once: 2, threads per run: 2" in machine.plan_jobs("auto", "auto", runs=6)[2]
    for jobs, threads, option in (("0", "auto", "--jobs"), ("two", "auto", "--jobs"), ("auto", "-1", "--threads")):
        with pytest.raises(ValueError, match=option):
            machine.plan_jobs(jobs, threads, runs=6)


def test_progress_lines_and_estimate_without_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)  # pytest's stderr is no terminal: lines, not a bar
    train(_config(steps=12), tmp_path)
    out = capsys.readouterr().out
    assert "ms/step over the first 10 steps, about " in out and " left for 2 steps" in out
    assert "step 12/12, loss " in out and "ETA 0m00s" in out


@pytest.mark.slow
def test_interrupted_ab_says_how_to_continue(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ab"
    args = ["--preset", "smoke", "--task", "digits", "--quiet", "--out", str(out), "--encodings", "none,liere8"]
    args += ["--jobs", "1"]  # the Ctrl-C hook is patched into this process
    monkeypatch.setattr(ab, "train", lambda config, *a, **k: train(config, *a, **k, hooks=[ctrl_c(config, 20)]))
    with pytest.raises(KeyboardInterrupt):
        ab.main(args)
    monkeypatch.undo()
    assert f"--out {out} --resume" in capsys.readouterr().err
    results = ab.main([*args, "--resume"])  # continues: the finished run is reused
    assert [r.encoding for r in results.runs] == ["none", "liere8"] and results.threads == torch.get_num_threads()
    assert results.cpu == machine.cpu_model() and AbResults.load(out).threads == results.threads
    (out / "none-s0" / layout.SUMMARY).write_text("")  # an empty summary, as a full disk left it before atomic writes
    again = ab.main([*args, "--resume"])
    assert "summary.json is empty" in capsys.readouterr().err
    assert [r.test for r in again.runs] == [r.test for r in results.runs]


def test_format_1_checkpoints_without_checksum_still_resume(crashed, tmp_path):
    full, run = crashed[0], _copy(crashed[1], tmp_path / "run")
    state = torch.load(run / layout.LAST, weights_only=True)
    old = {k: v for k, v in state.items() if k not in ("checksum", "window", "wall_time_s", "skipped")}
    torch.save(old | {"format_version": 1}, run / layout.LAST)
    summary = train(_config(log_every=4), run, resume=True, quiet=True)
    assert summary.state_sha256 == RunSummary.load(full / layout.SUMMARY).state_sha256
