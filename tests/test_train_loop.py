"""Training loop: loss falls on tiny image and LM runs, weight-decay groups, LR schedule, metrics log."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from train import run_dir as layout
from train.loop import cosine_schedule, param_groups, train
from train.presets import RunConfig, preset_config
from train.run_dir import check_folder
from train.tasks import SeededOrder, load_task


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_image_loss_falls_and_log_written(tmp_path):
    config = preset_config("smoke", "digits", encoding="liere8", steps=100, batch_size=64, lr=1e-2, eval_every=50)
    summary = train(config, tmp_path, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0] - 0.2
    assert [r["step"] for r in records if "val_accuracy" in r] == [50, 100]
    assert {"step", "loss", "lr", "images_per_s"} <= records[0].keys()
    assert summary.test["accuracy"] > 0.2  # chance is 0.1
    weights = torch.load(tmp_path / "last.pt")["model"]
    assert summary.params == sum(v.numel() for k, v in weights.items() if not k.endswith("_extra_state"))
    assert summary.step_time_ms > 0 and summary.peak_memory_kind == "cpu_rss"


def test_lm_loss_falls(tmp_path):
    config = preset_config("smoke", "pydoc", encoding="rope", steps=60, batch_size=16, lr=3e-3, eval_every=60)
    summary = train(config, tmp_path, quiet=True)
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0] - 0.5
    assert summary.metric == "bpc" and summary.val["bpc"] == pytest.approx(summary.val["loss"] / math.log(2))
    assert "tokens_per_s" in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])


def test_weight_decay_excludes_encoding_biases_and_norms():
    from models.vit import ViT

    model = ViT((1, 8, 8), 10, 2, encoding="liere8", dim=32, depth=2, heads=2)
    decay, no_decay = param_groups(model, 0.05)
    decayed = {id(p) for p in decay["params"]}
    encoding_params = list(model.encoding.parameters())
    assert encoding_params and not any(id(p) in decayed for p in encoding_params)
    assert not any(id(p) in decayed for n, p in model.named_parameters() if "norm" in n or n.endswith("bias"))
    assert id(model.head.weight) in decayed and no_decay["weight_decay"] == 0.0
    total = len(decay["params"]) + len(no_decay["params"])
    assert total == len(list(model.parameters()))


def test_cosine_schedule_shape():
    f = cosine_schedule(warmup=10, total=110, min_ratio=0.1)
    values = [f(s) for s in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(values[:10], values[1:10], strict=False))  # linear warmup rises
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))  # cosine falls monotonically
    assert values[60] == pytest.approx(0.55) and values[110] == pytest.approx(0.1)


def test_seeded_order_is_a_sharded_permutation():
    order = SeededOrder(10, seed=3)
    epoch = [i for step in range(5) for i in order.indices(step, 2)]
    assert sorted(epoch) == list(range(10))
    ranks = [order.indices(7, 4, rank, 2) for rank in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(order.indices(7, 4))
    assert SeededOrder(10, seed=3).indices(7, 4) == order.indices(7, 4)


def test_ranks_read_their_share_of_the_one_process_batch():
    task = load_task(preset_config("smoke", "digits", batch_size=16, steps=4, device="cpu"))
    x, y = next(task.batches(2))
    shares = [next(task.batches(2, rank, 2)) for rank in range(2)]
    for rank, (x_rank, y_rank) in enumerate(shares):  # rank r of 2 takes items r, r + 2, ... of the global batch
        assert torch.equal(x_rank, x[rank::2]) and torch.equal(y_rank, y[rank::2])


def test_bad_config_names_the_argument():
    with pytest.raises(ValueError, match="batch_size"):
        RunConfig(batch_size=0)
    with pytest.raises(ValueError, match="preset"):
        preset_config("huge", "arrow")


def test_presets_pick_the_weight_init_and_it_can_be_overridden():
    assert preset_config("cpu", "arrow").model_options["weight_init"] == "xavier"
    assert "weight_init" not in preset_config("gpu", "arrow").model_options  # the models' timm default
    assert "weight_init" not in preset_config("cpu", "austen").model_options  # the LM keeps timm's init
    old = preset_config("cpu", "arrow", weight_init="trunc_normal")
    assert (
        old.model_options["weight_init"] == "trunc_normal"
        and old.trajectory() != preset_config("cpu", "arrow").trajectory()
    )


def test_step_hooks_add_per_step_metrics(tmp_path):
    config = preset_config("smoke", "digits", encoding="liere8", steps=6, eval_every=6)
    seen = []

    def hook(step, model):
        seen.append(step)
        return {"generator_norm": model.encoding.skew_generators().detach().norm().item()}

    train(config, tmp_path, quiet=True, hooks=[hook])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert seen == [1, 2, 3, 4, 5, 6] and [r["step"] for r in records] == seen  # one record per step
    assert all(r["generator_norm"] > 0 for r in records) and "loss" in records[4]


@pytest.mark.slow
def test_training_loads_no_plotting_stack():
    check = "import sys, train.loop, train.__main__; assert 'matplotlib' not in sys.modules, 'matplotlib loaded'"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_fresh_run_refuses_a_folder_holding_only_a_sharded_checkpoint(tmp_path):
    (tmp_path / layout.LAST_DCP).mkdir()
    with pytest.raises(layout.RunExistsError, match=r"already holds a run \(last\.dcp\).*--resume"):
        check_folder(tmp_path, resume=False)
