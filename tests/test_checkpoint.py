"""Checkpoints: a SIGKILLed run resumes to the bitwise-identical result; corrupt or foreign checkpoints fail clearly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from train.checkpoint import CheckpointError, load_model
from train.loop import TEST_DIE_AT_STEP, train
from train.presets import preset_config

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--task", "digits", "--preset", "smoke", "--encoding", "liere8", "--steps", "30", "--ckpt-every", "10",
        "--device", "cpu", "--quiet"]  # fmt: skip


def _train(out: Path, *extra: str, die_at_step: int | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if die_at_step is not None:
        env[TEST_DIE_AT_STEP] = str(die_at_step)
    cmd = [sys.executable, "-m", "train", *ARGS, "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and one killed after step 25 (checkpoint at 20), then resumed."""
    root = tmp_path_factory.mktemp("ckpt")
    full = _train(root / "full")
    assert full.returncode == 0, full.stderr
    killed = _train(root / "killed", die_at_step=25)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (root / "killed" / "summary.json").exists()
    shutil.copytree(root / "killed", root / "crashed")  # the state right after the crash, for the error tests
    resumed = _train(root / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    return root


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(runs):
    full, resumed = _summary(runs / "full"), _summary(runs / "killed")
    assert resumed["final_loss"] == full["final_loss"]
    assert resumed["state_sha256"] == full["state_sha256"]
    assert resumed["test"] == full["test"]
    steps = [json.loads(line)["step"] for line in (runs / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # the crashed run's steps 21..25 were dropped, not doubled


@pytest.mark.slow
def test_checkpoint_rebuilds_the_model(runs):
    model = load_model(runs / "full" / "last.pt")
    assert sum(p.numel() for p in model.parameters()) == _summary(runs / "full")["params"]


def _config(**changes):
    base = dict(encoding="liere8", steps=30, ckpt_every=10, device="cpu")
    return preset_config("smoke", "digits", **(base | changes))


@pytest.mark.slow
def test_corrupt_checkpoint_falls_back_to_prev_or_raises_and_keeps_files(runs, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    shutil.copytree(runs / "crashed", run)
    last, prev = run / "last.pt", run / "prev.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as by a full disk
    prev.write_bytes(b"not a checkpoint at all")
    before = {p.name: p.read_bytes() for p in run.glob("*.pt")}
    with pytest.raises(CheckpointError, match=r"last\.pt is unreadable.*prev\.pt is unreadable"):
        train(_config(), run, resume=True, quiet=True)
    assert {p.name: p.read_bytes() for p in run.glob("*.pt")} == before
    shutil.copy(runs / "crashed" / "prev.pt", prev)  # a good prev.pt: the run falls back to it, saying so
    summary = train(_config(), run, resume=True, quiet=True)
    assert "moved it to last.pt.corrupt, resuming from" in capsys.readouterr().err
    assert summary.state_sha256 == _summary(runs / "full")["state_sha256"]


@pytest.mark.slow
def test_mismatched_config_raises(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "crashed", run)
    with pytest.raises(CheckpointError, match=r"last\.pt.*encoding: 'liere8' in checkpoint vs 'rope-mixed' now"):
        train(_config(encoding="rope-mixed"), run, resume=True, quiet=True)
    with pytest.raises(CheckpointError, match="lr"):
        train(_config(lr=0.5), run, resume=True, quiet=True)
    with pytest.raises(FileExistsError, match="resume"):  # a fresh run never overwrites a checkpoint
        train(_config(), run, quiet=True)
