"""DDP: two gloo ranks on CPU (torchrun) keep identical parameters and the loss falls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, os, sys
from train.loop import train
from train.presets import preset_config

config = preset_config("smoke", "digits", encoding="liere8", steps=100, batch_size=64, lr=1e-2, device="cpu")
summary = train(config, sys.argv[1], quiet=True)
rank = os.environ["RANK"]
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"sha": summary.state_sha256, "world_size": summary.world_size, "test": summary.test}, f)
"""


def test_two_ranks_stay_identical_and_learn(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["sha"] == ranks[1]["sha"]  # parameters bitwise identical on both ranks
    assert ranks[0]["test"] == ranks[1]["test"]  # all-reduced metrics agree
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0] - 0.2
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2  # written once, by rank 0
