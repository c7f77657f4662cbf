"""DDP: two gloo ranks on CPU (torchrun) keep identical parameters and the loss falls; a stalled rank is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, os, sys
from train.loop import train
from train.presets import preset_config

config = preset_config("smoke", "digits", encoding="liere8", steps=100, batch_size=64, lr=1e-2, device="cpu")
summary = train(config, sys.argv[1], quiet=True)
rank = os.environ["RANK"]
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"sha": summary.state_sha256, "world_size": summary.world_size, "test": summary.test,
               "final_loss": summary.final_loss}, f)
"""


STALL = """
import os, sys, time
from train.loop import train
from train.presets import preset_config

def stall(step, model):
    if step == 3 and os.environ["RANK"] == "1":
        time.sleep(8)  # a stopped process, as after kill -STOP

config = preset_config("smoke", "digits", encoding="none", steps=10, batch_size=16, device="cpu")
train(config, sys.argv[1], quiet=True, hooks=[stall], ddp_timeout=2)
"""


def _torchrun(tmp_path: Path, source: str) -> tuple[subprocess.CompletedProcess, Path]:
    script = tmp_path / "ddp_run.py"
    script.write_text(source)
    out = tmp_path / "run"
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300), out


@pytest.mark.slow
def test_two_ranks_stay_identical_and_learn(tmp_path):
    done, out = _torchrun(tmp_path, SCRIPT)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["sha"] == ranks[1]["sha"]  # parameters bitwise identical on both ranks
    assert ranks[0]["test"] == ranks[1]["test"]  # all-reduced metrics agree
    assert ranks[0]["final_loss"] == ranks[1]["final_loss"]  # the mean over ranks, not each rank's own
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0] - 0.2
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2  # written once, by rank 0


@pytest.mark.slow
def test_a_stalled_rank_fails_the_job_naming_it(tmp_path):
    done, _ = _torchrun(tmp_path, STALL)
    assert done.returncode != 0
    assert "RankTimeout: rank 0: rank(s) 1 stopped answering for --ddp-timeout 2 s during step 4" in done.stderr
