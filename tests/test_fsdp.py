"""FSDP2 (``--fsdp``) with two gloo ranks on CPU: the loss curve equals DDP's, a killed run resumes from its DCP
checkpoint to the uninterrupted result, a 2-rank checkpoint resumes on 1 rank, and a signal to one rank stops both
at the same step with a checkpoint (``train.preemption``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
SCRIPT = """
import json, os, signal, sys
from train.loop import train
from train.preemption import Preempted
from train.presets import preset_config

root, resume = sys.argv[1], sys.argv[2:]
rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
config = preset_config("smoke", "digits", encoding="liere8", steps=STEPS, batch_size=16, log_every=3, ckpt_every=8,
                       eval_every=10, device="cpu")

def run(name, fsdp=True, signal_at=None, **options):
    def send_signal(step, model):  # SIGUSR1 to the last rank only, as a signal reaching one process first
        if step == signal_at and rank == world - 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    out = os.path.join(root, name)
    try:
        summary = train(config, out, quiet=True, fsdp=fsdp, hooks=[send_signal], **options)
    except Preempted as err:
        print(f"rank {rank}: {err}", flush=True)
        return
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"sha": summary.state_sha256, "world_size": summary.world_size}, f)

if resume:
    run(resume[0], resume=True)
else:  # one launch, one process group, five runs (the last one is killed)
    run("ddp", fsdp=False)
    run("fsdp")
    run("stopped", signal_at=5)
    run("ddp-stopped", fsdp=False, signal_at=5)
    run("ddp-stopped", fsdp=False, resume=True)
    # the last rank is SIGKILLed after step 12 (newest checkpoint: step 8); the other fails in its next collective
    if rank == world - 1:
        os.environ["LIERE_TEST_DIE_AT_STEP"] = "12"
    run("killed")
""".replace("STEPS", str(STEPS))


def launch(tmp_path: Path, *args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """The script with ``args`` under ``torchrun --nproc_per_node ranks`` (a plain process for ``ranks=0``)."""
    script = tmp_path / "fsdp_run.py"
    script.write_text(SCRIPT)
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks else []
    cmd = [sys.executable, *runner, str(script), str(tmp_path), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def result(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """One 2-rank launch: DDP, FSDP, FSDP stopped by SIGUSR1 after step 5, DDP stopped so and resumed, FSDP with
    one rank killed after step 12. Losses are logged every 3 steps, so each checkpoint (steps 5 and 8) falls inside a
    loss window: a resume must restore every rank's window to log the same numbers."""
    tmp = tmp_path_factory.mktemp("fsdp")
    done = launch(tmp)
    assert not (tmp / "killed" / "summary.json").exists()
    assert json.loads((tmp / "killed" / "last.dcp" / "manifest.json").read_text())["step"] == 8, done.stderr[-3000:]
    assert done.returncode != 0  # the killed run
    return done, tmp


@pytest.mark.slow
def test_fsdp_loss_curve_equals_ddp(runs: tuple[subprocess.CompletedProcess, Path]) -> None:
    done, tmp = runs
    ddp, fsdp = losses(tmp / "ddp"), losses(tmp / "fsdp")
    assert len(ddp) == len(fsdp) == STEPS // 3 + 1, done.stderr[-3000:]  # every 3 steps, and the last one
    # fp32 tolerance: FSDP reduce-scatters the gradients where DDP all-reduces them (another summation order)
    torch.testing.assert_close(torch.tensor(fsdp), torch.tensor(ddp), rtol=1e-5, atol=1e-5)
    assert result(tmp / "fsdp", 0)["sha"] == result(tmp / "fsdp", 1)["sha"]  # gathered weights agree on both ranks
    files = sorted(p.name for p in (tmp / "fsdp" / "last.dcp").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json", "train_state.pt"]
    assert json.loads((tmp / "fsdp" / "summary.json").read_text())["checkpoint"].endswith("last.dcp")


@pytest.mark.slow
def test_killed_fsdp_run_resumes_bitwise(runs: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, tmp = runs
    done = launch(tmp, "killed")
    assert done.returncode == 0, done.stderr[-3000:]
    assert result(tmp / "killed")["sha"] == result(tmp / "fsdp")["sha"]
    assert losses(tmp / "killed") == losses(tmp / "fsdp")


@pytest.mark.slow
def test_signal_to_one_rank_stops_both_with_a_checkpoint_that_resumes_on_one_rank(
    runs: tuple[subprocess.CompletedProcess, Path],
) -> None:
    stopped, tmp = runs
    assert "rank 0: stopped by SIGUSR1 after step 5" in stopped.stdout, stopped.stderr[-3000:]
    assert "rank 1: stopped by SIGUSR1 after step 5" in stopped.stdout
    assert json.loads((tmp / "stopped" / "last.dcp" / "manifest.json").read_text())["step"] == 5
    done = launch(tmp, "stopped", ranks=0)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "written by 2 processes, resharded onto 1" in done.stderr
    assert result(tmp / "stopped")["world_size"] == 1
    # 1 rank sums the gradient of the global batch of 16 at once, 2 ranks in two halves: fp32 rounding only
    losses_1, losses_2 = losses(tmp / "stopped"), losses(tmp / "fsdp")
    torch.testing.assert_close(torch.tensor(losses_1), torch.tensor(losses_2), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_signal_to_one_ddp_rank_stops_both_and_resume_is_bitwise(
    runs: tuple[subprocess.CompletedProcess, Path],
) -> None:
    stopped, tmp = runs
    saved = tmp / "ddp-stopped" / "last.pt"
    for rank in range(2):
        assert f"rank {rank}: stopped by SIGUSR1 after step 5; checkpoint {saved}" in stopped.stdout
    assert result(tmp / "ddp-stopped")["sha"] == result(tmp / "ddp")["sha"]
    assert losses(tmp / "ddp-stopped") == losses(tmp / "ddp")
