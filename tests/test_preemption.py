"""Preemption and sharded checkpoints in one process: SIGTERM/SIGUSR1 stop a run after the step in progress with a
checkpoint and exit status 75, and ``--resume`` reaches the uninterrupted result bitwise; ``--fsdp`` on one
process equals the unsharded run, its DCP checkpoints fall back past a missing shard (named), and mismatched
checkpoint kinds or unshardable encodings are refused before any data loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import liere
import liere.factory
from train import loop
from train.checkpoint import CheckpointError
from train.loop import train
from train.preemption import EXIT_PREEMPTED, Preempted
from train.presets import preset_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 12


def config(**changes: object):
    base = dict(encoding="liere8", steps=STEPS, ckpt_every=4, eval_every=STEPS, device="cpu")
    return preset_config("smoke", "digits", **(base | changes))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The state hash of an uninterrupted single-process run, trained with 1 thread like the subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(config(), tmp_path_factory.mktemp("ref") / "run", quiet=True).state_sha256
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def process_group():
    """``--fsdp`` in this process creates a one-process group: destroy it afterwards, for the other tests."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def signal_at(step: int, signum: int) -> loop.StepHook:
    def hook(done: int, model: nn.Module) -> None:
        if done == step:
            os.kill(os.getpid(), signum)

    return hook


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_after_the_step_and_resume_is_bitwise(reference, tmp_path, one_thread, signum) -> None:
    run = tmp_path / "run"
    with pytest.raises(Preempted, match=rf"stopped by {signum.name} after step 6; checkpoint .*last\.pt"):
        train(config(), run, quiet=True, hooks=[signal_at(6, signum)])
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 6  # written at the stop, not the step-4 one
    assert signal.getsignal(signum) is signal.SIG_DFL  # the handler is restored
    assert train(config(), run, resume=True, quiet=True).state_sha256 == reference


@pytest.mark.slow
def test_sigterm_to_the_command_exits_75_and_resume_is_bitwise(reference, tmp_path) -> None:
    run = tmp_path / "run"
    args = ["--task", "digits", "--preset", "smoke", "--steps", str(STEPS), "--ckpt-every", "4", "--eval-every",
            str(STEPS), "--device", "cpu", "--quiet", "--threads", "1", "--out", str(run)]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # training has started (the log is opened after the model is built)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1].decode()
    assert process.returncode == EXIT_PREEMPTED, stderr
    assert "preempted: stopped by SIGTERM after step" in stderr and "--resume" in stderr
    resumed = subprocess.run([sys.executable, "-m", "train", *args, "--resume"], cwd=REPO, env=env, timeout=120)
    assert resumed.returncode == 0
    assert json.loads((run / "summary.json").read_text())["state_sha256"] == reference


@pytest.mark.slow
def test_fsdp_on_one_process_equals_the_unsharded_run_and_skips_a_missing_shard(
    reference, tmp_path, one_thread, process_group, capsys
) -> None:
    run = tmp_path / "run"
    assert train(config(), run, quiet=True, fsdp=True).state_sha256 == reference
    assert json.loads((run / "last.dcp" / "manifest.json").read_text())["step"] == STEPS
    (run / "last.dcp" / "__0_0.distcp").unlink()
    summary = train(config(), run, quiet=True, fsdp=True, resume=True)  # from prev.dcp (step 8) to step 12 again
    err = capsys.readouterr().err
    assert "last.dcp is missing shard file(s) __0_0.distcp; moved it to last.dcp.corrupt, resuming from" in err
    assert "prev.dcp (step 8)" in err
    assert summary.state_sha256 == reference
    (run / "last.dcp" / "train_state.pt").write_bytes(b"garbage")
    (run / "prev.dcp" / "manifest.json").unlink()
    with pytest.raises(
        CheckpointError, match=r"train_state\.pt do\(es\) not match manifest.*prev\.dcp has no manifest"
    ):
        train(config(), run, quiet=True, fsdp=True, resume=True)


def test_checkpoint_kind_mismatch_says_what_to_do(tmp_path, process_group, monkeypatch) -> None:
    monkeypatch.setattr(loop, "load_task", lambda config: pytest.fail("data loaded before the check"))
    (tmp_path / "ddp").mkdir()
    (tmp_path / "ddp" / "last.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"single-process/DDP checkpoint \(last\.pt\); resume it without --fsdp"):
        train(config(), tmp_path / "ddp", resume=True, fsdp=True)
    (tmp_path / "fsdp" / "last.dcp").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"sharded --fsdp checkpoint \(last\.dcp/\); resume it with --fsdp"):
        train(config(), tmp_path / "fsdp", resume=True)


def test_fsdp_refuses_an_encoding_without_initial_state_before_data_loads(tmp_path, process_group, monkeypatch) -> None:
    class Learned(liere.PositionEncoding):
        def __init__(self, head_dim: int, num_axes: int) -> None:
            super().__init__(head_dim=head_dim, num_axes=num_axes)
            self.freqs = nn.Parameter(torch.ones(head_dim // 2))

    monkeypatch.setattr(liere.factory, "_REGISTRY", dict(liere.factory._REGISTRY))  # restored after the test
    liere.register("learned-nostate")(Learned)
    monkeypatch.setattr(loop, "load_task", lambda config: pytest.fail("data loaded before the check"))
    with pytest.raises(ValueError, match=r"--fsdp: encoding 'learned-nostate' cannot be sharded: .*\['freqs'\]"):
        train(config(encoding="learned-nostate"), tmp_path / "run", fsdp=True)
