"""The training loop shared by every task: AdamW, warmup + cosine schedule, checkpoints, resume and DDP.

``train(config, run_dir)`` runs ``config.steps`` optimizer steps and leaves in ``run_dir``:
``metrics.jsonl`` (one JSON object per log/eval step), ``last.pt``/``prev.pt`` checkpoints, ``summary.json``
(final metrics, parameter count, step time, peak memory) and ``tb/`` when TensorBoard is installed.
Under ``torchrun`` it trains with ``DistributedDataParallel``: rank ``r`` reads its share of each seeded
global batch, metrics are all-reduced and only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from train import checkpoint, inspect
from train.presets import RunConfig
from train.tasks import Task, autocast, load_task

TIMING_WARMUP = 5  # first steps of a process left out of the mean step time (allocation, compilation)

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # tensorboard is optional
    SummaryWriter = None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; under torchrun each process takes GPU ``local_rank``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device='cpu' or 'auto'")
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """``(rank, world_size)``; joins the torchrun process group (nccl on CUDA, gloo on CPU) when launched by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes (a no-op without a process group)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay for weight matrices; none for biases, norms and ``model.no_weight_decay()`` names."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    named = dict(model.named_parameters())
    if unknown := skip - named.keys():
        raise ValueError(f"model.no_weight_decay() names unknown parameters: {sorted(unknown)}")
    decay = [p for n, p in named.items() if p.requires_grad and p.dim() >= 2 and n not in skip]
    no_decay = [p for n, p in named.items() if p.requires_grad and (p.dim() < 2 or n in skip)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_schedule(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR factor at step ``s``: linear warmup to 1 over ``warmup`` steps, then cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory in MiB: CUDA ``max_memory_allocated``, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_kind": "cuda_allocated"}
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_memory_kind": "cpu_rss"}


class MetricsLog:
    """JSONL metrics (and TensorBoard scalars when available); on resume drops records past the checkpoint."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool) -> None:
        self.path, self.enabled, self.writer = run_dir / "metrics.jsonl", enabled, None
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if SummaryWriter is not None:
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (must contain ``step``)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names and exact bytes): equal iff the weights are bitwise equal."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def evaluate(task: Task, model: nn.Module, split: str, device: torch.device, rank: int, world: int) -> dict:
    """Task metrics of ``model`` on ``split`` (``val``/``test``), all-reduced over processes."""
    was_training = model.training
    model.eval()
    stats = all_reduce(task.eval_stats(model, split, device, rank, world))
    model.train(was_training)
    return task.summarize(stats)


def run_guard(config: RunConfig, world_size: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the config's trajectory fields and the process count."""
    return config.trajectory() | {"world_size": world_size}


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    task: Task | None = None,
    resume: bool = False,
    quiet: bool = False,
    die_at_step: int | None = None,
) -> dict[str, Any]:
    """Train one run into ``run_dir`` and return its summary (also written to ``summary.json`` by rank 0).

    ``task`` reuses already loaded data (it must match ``config``). With ``resume`` the run continues from
    ``run_dir``'s checkpoint, which must come from the same config; without one it starts fresh.
    ``die_at_step`` SIGKILLs the process after that step (and its checkpoint, if due): a crash for tests.
    """
    run_dir, wall_start = Path(run_dir), time.perf_counter()
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    task = load_task(config) if task is None else task
    guard = run_guard(config, world)

    torch.manual_seed(config.seed)
    model = task.build_model().to(device)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(config.warmup_steps, config.steps, config.min_lr_ratio)
    )
    start, timing, loss_value, metrics = 0, {"seconds": 0.0, "steps": 0}, float("nan"), {}
    ckpt_path = checkpoint.find(run_dir) if resume else None
    if ckpt_path is not None:
        state = checkpoint.read(ckpt_path, map_location=device)
        checkpoint.check_config(ckpt_path, state, guard)
        checkpoint.load_state_dict(ckpt_path, model, state["model"], "model")
        checkpoint.load_state_dict(ckpt_path, optimizer, state["optimizer"], "optimizer")
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        start, timing, loss_value, metrics = state["step"], state["timing"], state["loss"], state["val"]
    elif checkpoint.find(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds a checkpoint; pass resume=True (--resume) or another folder")

    net: nn.Module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model  # fmt: skip
    if config.compile:
        net = torch.compile(net)
    log = MetricsLog(run_dir, start, enabled=rank == 0)
    run_dir.mkdir(parents=True, exist_ok=True)
    workers = min(4, os.cpu_count() or 1) if device.type == "cuda" else 0
    bar = tqdm(total=config.steps, initial=start, disable=quiet or rank != 0 or not sys.stderr.isatty(),
               desc=f"{config.task} {config.encoding} s{config.seed}", dynamic_ncols=True)  # fmt: skip
    window = {"loss": 0.0, "steps": 0, "items": 0, "seconds": 0.0}
    model.train()
    for step, (x, y) in enumerate(task.batches(start, rank, world, workers), start=start + 1):
        tick = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):
            loss = task.loss(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()  # synchronises, so the step time below is the real one
        elapsed = time.perf_counter() - tick
        if step - start > TIMING_WARMUP:
            timing = {"seconds": timing["seconds"] + elapsed, "steps": timing["steps"] + 1}
        window = {"loss": window["loss"] + loss_value, "steps": window["steps"] + 1,
                  "items": window["items"] + task.items(y), "seconds": window["seconds"] + elapsed}  # fmt: skip
        bar.update(1)

        record: dict[str, Any] = {}
        if step % config.log_every == 0 or step == config.steps:
            mean = all_reduce(torch.tensor([window["loss"] / window["steps"]], device=device)).item() / world
            rate = window["items"] * world / max(window["seconds"], 1e-9)
            unit = "tokens_per_s" if task.metric == "bpc" else "images_per_s"
            record |= {"loss": mean, "lr": scheduler.get_last_lr()[0], unit: rate}
            bar.set_postfix(loss=f"{mean:.4f}", **{unit.split("_")[0] + "/s": f"{rate:.0f}"})
            window = dict.fromkeys(window, 0)
        if step % config.eval_every == 0 or step == config.steps:
            metrics = evaluate(task, model, "val", device, rank, world)
            record |= {f"val_{k}": v for k, v in metrics.items()} | inspect.position_metrics(model)
        if record:
            log.write({"step": step, **record})
        if rank == 0 and (step % config.ckpt_every == 0 or step == config.steps):
            state = dict(step=step, model=model.state_dict(), optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), timing=timing, loss=loss_value, val=metrics)  # fmt: skip
            checkpoint.save(run_dir / checkpoint.LAST, checkpoint.bundle(guard, task.model_spec, **state))
        if step == die_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    log.close()

    test = evaluate(task, model, "test", device, rank, world)
    summary = {
        "config": config.to_dict(),
        "config_hash": checkpoint.config_hash(guard),
        "model_spec": task.model_spec,
        "checkpoint": str(run_dir / checkpoint.LAST),
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "final_loss": loss_value,
        "val": metrics,
        "test": test,
        "params": count_parameters(model),
        "state_sha256": state_sha256(model),
        "step_time_ms": 1000 * timing["seconds"] / timing["steps"] if timing["steps"] else float("nan"),
        **peak_memory(device),
        "steps": config.steps,
        "world_size": world,
        "device": str(device),
        "data_source": task.source,
        "wall_time_s": time.perf_counter() - wall_start,
    }
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
