"""The training loop shared by every task: AdamW, warmup + cosine schedule, checkpoints, resume and DDP.

``train(config, run_dir)`` runs ``config.steps`` optimizer steps and leaves in ``run_dir`` (layout:
``train.run_dir``): ``metrics.jsonl`` (one JSON object per log/eval step), ``last.pt``/``prev.pt``
checkpoints, ``summary.json`` (``train.summaries.RunSummary``) and ``tb/`` when TensorBoard is installed.
It runs in three parts: ``restore`` (lock the folder, build model and optimizer, load a checkpoint),
``train_step`` (one optimizer step, refusing non-finite losses and gradients) and ``finish`` (test metrics
and the summary). Under ``torchrun`` it trains with ``DistributedDataParallel``, or with ``fsdp=True`` with FSDP2
(``train.distributed``: device, process group and FSDP set-up; sharded checkpoints ``last.dcp/``:
``train.dcp_checkpoint``): rank ``r`` reads its share of each seeded global batch, metrics are all-reduced and only
rank 0 writes files (``train.progress``: metrics log and progress lines; ``train.run_dir``: folder checks). SIGTERM
or SIGUSR1 stops the run after the step in progress, with a checkpoint (``train.preemption``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from liere.analysis import position_metrics
from liere.weight_decay import no_weight_decay_names
from models.blocks import is_sharded
from train import checkpoint, dcp_checkpoint, distributed
from train import run_dir as layout
from train.distributed import (
    DDP_TIMEOUT_S,
    RankTimeout,
    all_gather,
    all_reduce,
    init_distributed,
    resolve_device,
    silent_ranks,
)
from train.preemption import Preempted, StopSignals
from train.presets import RunConfig
from train.progress import TIMING_WARMUP, MetricsLog, Progress
from train.run_dir import check_folder
from train.summaries import Divergence, RunSummary
from train.tasks import Task, autocast, load_task

ON_NONFINITE = ("stop", "skip")
TEST_DIE_AT_STEP = "LIERE_TEST_DIE_AT_STEP"  # tests: SIGKILL the process after this step (a crash)

StepHook = Callable[[int, nn.Module], Mapping[str, float] | None]
"""``hook(step, model)`` runs on every process after each optimizer step; what it returns joins that step's
``metrics.jsonl`` record (written by rank 0). It must not run collectives."""


class Diverged(RuntimeError):
    """A non-finite loss or gradient stopped the run; ``summary`` is the diverged run's summary."""

    def __init__(self, summary: RunSummary) -> None:
        super().__init__(Divergence(**summary.diverged).message())
        self.summary = summary


def resume_window(windows: list[dict[str, float]], rank: int, world: int) -> dict[str, float]:
    """This rank's loss window at a resume: its own on the same number of ranks (the next logged mean equals the
    uninterrupted run's), else every rank gets the mean loss of the saved ones (resharded runs)."""
    if len(windows) == world:
        return windows[rank]
    return windows[0] | {"loss": sum(w["loss"] for w in windows) / len(windows)}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay for weight matrices; none for biases, norms, position encodings' parameters
    (``liere.no_weight_decay_names``) and ``model.no_weight_decay()`` names."""
    skip = no_weight_decay_names(model) | (set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set())
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


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of the model's (full, also when sharded) state dict (names and exact bytes): equal iff the weights
    are bitwise equal. A collective for a sharded model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(distributed.full_state_dict(model).items()):
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
    with distributed.gathered(model):  # sharded: ranks may evaluate different numbers of batches
        stats = all_reduce(task.eval_stats(model, split, device, rank, world))
    model.train(was_training)
    return task.summarize(stats)


def run_guard(config: RunConfig, world_size: int, fsdp: bool = False) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the config's trajectory fields and the process count; for
    ``fsdp`` runs, whose sharded checkpoints load on any number of processes, ``fsdp`` instead of the count."""
    return config.trajectory() | ({"fsdp": True} if fsdp else {"world_size": world_size})


@dataclass
class Run:
    """Everything ``train_step`` needs and updates: the model, its optimizer, counters and the log."""

    config: RunConfig
    task: Task
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    guard: dict[str, Any]
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    log: MetricsLog
    step: int = 0  # optimizer steps done
    loss: float = float("nan")  # the last step's (local) loss
    val: dict[str, float] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=lambda: {"seconds": 0.0, "steps": 0})
    window: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("loss", "steps", "items", "seconds"), 0))
    wall_before: float = 0.0  # wall time of earlier processes of this run, up to their last checkpoint
    wall_start: float = field(default_factory=time.perf_counter)
    skipped: int = 0
    process_start: int = 0  # the step this process started from (its first steps are left out of the timing)
    saved: tuple[str, int] | None = None  # the newest checkpoint of the run: (path, step)
    fsdp: bool = False  # sharded with FSDP2: DCP checkpoints

    def wall_time(self) -> float:
        return self.wall_before + time.perf_counter() - self.wall_start

    def save(self) -> None:
        """Checkpoint (rank 0; every rank with ``fsdp``): everything ``restore`` needs to continue bitwise
        identically."""
        train_state = self.train_state()  # a collective (every rank's loss window)
        if self.fsdp:
            state = checkpoint.bundle(self.guard, self.task.model_spec, world_size=self.world, **train_state)
            path = dcp_checkpoint.save(self.run_dir, self.model, self.optimizer, self.rank, state)
        else:
            path = self.run_dir / layout.LAST
            if self.rank == 0:
                state = dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), **train_state)
                checkpoint.save(path, checkpoint.bundle(self.guard, self.task.model_spec, **state))
        self.saved = (str(path), self.step)

    def train_state(self) -> dict[str, Any]:
        """The checkpointed state besides model and optimizer; a collective under torchrun."""
        return dict(
            step=self.step,
            scheduler=self.scheduler.state_dict(),
            timing=self.timing,
            loss=self.loss,
            val=self.val,
            window=self.window,
            windows=all_gather(self.window, self.world),
            wall_time_s=self.wall_time(),
            skipped=self.skipped,
        )


def find_checkpoint(
    config: RunConfig, run_dir: Path, resume: bool, device: torch.device, rank: int, world: int, fsdp: bool = False
) -> tuple[Path, dict[str, Any]] | None:
    """With ``resume``: the newest valid checkpoint of ``run_dir`` (a DCP folder with ``fsdp``), checked against
    ``config`` (no data needed, so a bad or foreign checkpoint is refused before the data set loads). None for a
    fresh run."""
    if not resume:
        found = None
    elif fsdp:
        found = dcp_checkpoint.find_valid(run_dir, rank)
    else:
        found = checkpoint.find_valid(run_dir, map_location=device)
    if found is not None:
        checkpoint.check_config(*found, run_guard(config, world, fsdp))
    elif resume:
        refuse_lost_run(config, run_dir)
    return found


def refuse_lost_run(config: RunConfig, run_dir: Path) -> None:
    """``--resume`` found no checkpoint: refuse when the folder shows there was one (``summary.json``, or metrics
    logged past the first checkpoint step), rather than silently start over and overwrite the run's files. A run
    stopped before its first checkpoint was written (also between that step's metrics line, which is written first,
    and the checkpoint) starts over, saying so."""
    summary, metrics = run_dir / layout.SUMMARY, run_dir / layout.METRICS
    logged = max((r.get("step", 0) for r in layout.read_jsonl(metrics)), default=0) if metrics.is_file() else 0
    if summary.exists() or logged > config.ckpt_every:
        what = layout.SUMMARY if summary.exists() else f"{layout.METRICS} up to step {logged}"
        raise layout.RunFolderError(
            f"{run_dir} holds a run ({what}) but no {layout.LAST} or {layout.PREV} to resume it from; resuming would "
            "start it over at step 0 and overwrite its files. Restore its checkpoint, or pass --restart to train it "
            "again from step 0 (train.ab: delete that run folder), or choose another --out"
        )
    if logged:
        layout.warn(
            f"{run_dir}: no checkpoint yet ({layout.METRICS} ends at step {logged}, the first checkpoint is due at "
            f"step {config.ckpt_every}); starting the run over from step 0"
        )


def restore(
    config: RunConfig,
    run_dir: Path,
    task: Task,
    found: tuple[Path, dict[str, Any]] | None,
    device: torch.device,
    rank: int,
    world: int,
    fsdp: bool = False,
) -> Run:
    """Build model (sharded with ``fsdp``), optimizer and schedule; load the checkpoint ``found``
    (``find_checkpoint``) if any."""
    guard = run_guard(config, world, fsdp)
    torch.manual_seed(config.seed)
    model = distributed.build_sharded_model(task, device) if fsdp else task.build_model().to(device)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(config.warmup_steps, config.steps, config.min_lr_ratio)
    )
    saved: dict[str, Any] = {}
    if found is not None:
        path, state = found
        if fsdp:
            dcp_checkpoint.load(path, model, optimizer)
            if state["world_size"] != world and rank == 0:
                layout.warn(f"{path} was written by {state['world_size']} processes, resharded onto {world}")
        else:
            checkpoint.load_state_dict(path, model, state["model"], "model")
            checkpoint.load_state_dict(path, optimizer, state["optimizer"], "optimizer")
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        saved = dict(
            step=state["step"],
            timing=state["timing"],
            loss=state["loss"],
            val=state["val"],
            saved=(str(path), state["step"]),
        )
        saved |= {k: state[k] for k in ("window", "skipped") if k in state}  # absent in format-1 checkpoints
        if windows := state.get("windows"):  # every rank's loss window since the last logged step
            saved["window"] = resume_window(windows, rank, world)
        saved["wall_before"] = state.get("wall_time_s", 0.0)
        if rank == 0:
            print(f"[train] resuming {run_dir} from step {state['step']} of {config.steps} ({path.name})", flush=True)
    net: nn.Module = model
    if world > 1 and not fsdp:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)
    log = MetricsLog(run_dir, saved.get("step", 0), enabled=rank == 0)
    return Run(
        config, task, run_dir, device, rank, world, guard, model, net, optimizer, scheduler, log, fsdp=fsdp, **saved
    )


def _grad_norm(run: Run) -> torch.Tensor:
    """Total gradient norm, clipped to ``config.grad_clip`` when that is > 0."""
    clip = run.config.grad_clip if run.config.grad_clip > 0 else float("inf")
    norm = nn.utils.clip_grad_norm_(run.model.parameters(), clip)
    return norm.full_tensor() if is_sharded(norm) else norm


def _params_finite(model: nn.Module) -> bool:
    """Whether every parameter is finite (sharded ones gathered: a collective, reached by all ranks alike)."""
    return all(bool(torch.isfinite(p.full_tensor() if is_sharded(p) else p).all()) for p in model.parameters())


def _diverged(run: Run, step: int, loss: float, norm: float, cause: str = "") -> Divergence:
    path, saved_step = run.saved if run.saved else (None, None)
    return Divergence(step, loss, norm, path, saved_step, cause)


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, on_nonfinite: str = "stop") -> Divergence | None:
    """One optimizer step on the batch ``(x, y)``; returns a ``Divergence`` (and leaves the model untouched) when
    the loss or the gradient is not finite and ``on_nonfinite="stop"``; with ``"skip"`` such a step only
    advances the schedule. Updates ``run``'s counters; logging is the caller's."""
    step, tick = run.step + 1, time.perf_counter()
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    run.optimizer.zero_grad(set_to_none=True)
    try:
        with autocast(run.device):
            loss = run.task.loss(run.net(x), y)
        loss.backward()
    except (ValueError, RuntimeError) as err:  # e.g. an exponential of non-finite generators
        if "non-finite" not in str(err) and _params_finite(run.model):
            raise
        return _diverged(run, step, float("nan"), float("nan"), f"{type(err).__name__}: {err}")
    norm = _grad_norm(run)
    loss_value, norm_value = torch.stack([loss.detach().float(), norm.float()]).tolist()  # one sync
    bad = torch.tensor([float(not (math.isfinite(loss_value) and math.isfinite(norm_value)))], device=run.device)
    if all_reduce(bad).item():  # every rank decides alike
        if on_nonfinite == "stop":
            return _diverged(run, step, loss_value, norm_value)
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        run.step, run.skipped = step, run.skipped + 1
        run.log.write(
            {
                "step": step,
                "skipped_nonfinite": 1,
                "nonfinite_loss": str(loss_value),
                "nonfinite_grad_norm": str(norm_value),
            }
        )
        if run.rank == 0:
            print(f"warning: step {step}: skipped (loss {loss_value}, gradient norm {norm_value})", file=sys.stderr)
        return None
    run.optimizer.step()
    run.scheduler.step()
    elapsed = time.perf_counter() - tick
    run.step, run.loss = step, loss_value
    if step - run.process_start > TIMING_WARMUP:
        run.timing = {"seconds": run.timing["seconds"] + elapsed, "steps": run.timing["steps"] + 1}
    w = run.window
    run.window = {
        "loss": w["loss"] + loss_value,
        "steps": w["steps"] + 1,
        "items": w["items"] + run.task.items(y),
        "seconds": w["seconds"] + elapsed,
    }
    return None


def log_step(run: Run, extra: Mapping[str, float] | None, progress: Progress) -> None:
    """The step's metrics record: mean loss over the log window, LR and rate; validation metrics when due."""
    config, step, record = run.config, run.step, dict(extra or {})
    if (step % config.log_every == 0 or step == config.steps) and run.window["steps"]:
        w = run.window
        mean = all_reduce(torch.tensor([w["loss"] / w["steps"]], device=run.device)).item() / run.world
        rate = w["items"] * run.world / max(w["seconds"], 1e-9)
        record |= {"loss": mean, "lr": run.scheduler.get_last_lr()[0], run.task.rate_unit: rate}
        progress.postfix(loss=f"{mean:.4f}", **{run.task.rate_unit.split("_")[0] + "/s": f"{rate:.0f}"})
        progress.loss = mean
        run.window = dict.fromkeys(w, 0)
    if step % config.eval_every == 0 or step == config.steps:
        run.val = evaluate(run.task, run.model, "val", run.device, run.rank, run.world)
        with distributed.gathered(run.model):
            record |= {f"val_{k}": v for k, v in run.val.items()} | position_metrics(run.model)
    if record:
        run.log.write({"step": step, **record})


def summarize(run: Run, test: dict[str, float], divergence: Divergence | None = None) -> RunSummary:
    """The run's summary; ``final_loss`` is the mean over ranks of the last step's loss."""
    final_loss = all_reduce(torch.tensor([run.loss], device=run.device)).item() / run.world
    timing = run.timing
    return RunSummary(
        config=run.config.to_dict(),
        config_hash=checkpoint.config_hash(run.guard),
        model_spec=run.task.model_spec,
        checkpoint=str(run.run_dir / (layout.LAST_DCP if run.fsdp else layout.LAST)),
        metric=run.task.metric,
        higher_is_better=run.task.higher_is_better,
        final_loss=final_loss if math.isfinite(final_loss) else None,
        val=run.val,
        test=test,
        params=count_parameters(run.model),
        state_sha256=state_sha256(run.model),
        step_time_ms=1000 * timing["seconds"] / timing["steps"] if timing["steps"] else float("nan"),
        **peak_memory(run.device),
        steps=run.config.steps,
        world_size=run.world,
        device=str(run.device),
        data_source=run.task.source,
        wall_time_s=run.wall_time(),
        diverged=None if divergence is None else divergence.__dict__,
        skipped_steps=run.skipped,
        threads=torch.get_num_threads(),
    )


def finish(run: Run, divergence: Divergence | None = None) -> RunSummary:
    """Test metrics (none for a diverged run) and ``summary.json`` (rank 0)."""
    run.log.close()
    test = {} if divergence else evaluate(run.task, run.model, "test", run.device, run.rank, run.world)
    summary = summarize(run, test, divergence)
    if run.rank == 0:
        layout.write_json(run.run_dir / layout.SUMMARY, summary.to_dict())
    return summary


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    task: Task | None = None,
    resume: bool = False,
    restart: bool = False,
    quiet: bool = False,
    on_nonfinite: str = "stop",
    hooks: Sequence[StepHook] = (),
    ddp_timeout: float = DDP_TIMEOUT_S,
    bars: bool = True,
    fsdp: bool = False,
) -> RunSummary:
    """Train one run into ``run_dir`` and return its summary (also written to ``summary.json`` by rank 0).

    ``task`` reuses already loaded data (it must match ``config``). With ``resume`` the run continues from
    ``run_dir``'s newest valid checkpoint (without one it starts fresh, unless the folder shows a checkpoint was
    lost: ``refuse_lost_run``); with ``restart`` the run files in ``run_dir`` are removed and it starts over;
    with neither, a folder that holds a run is refused. The checkpoint is read and checked before the data loads.
    A non-finite loss or gradient raises ``Diverged`` (after writing the diverged summary), or with
    ``on_nonfinite="skip"`` skips that step. ``hooks`` add per-step metrics (``StepHook``).
    ``bars``: a tqdm bar on a terminal (else progress lines; ``train.ab`` worker processes, whose bars would
    interleave, pass False). For tests, the environment variable ``LIERE_TEST_DIE_AT_STEP`` SIGKILLs the process
    after that step (and its checkpoint, if due): a crash.
    ``fsdp`` shards model, gradients and optimizer state with FSDP2 (also on one process) and checkpoints with DCP.
    SIGTERM or SIGUSR1 ends the run after the step in progress with a checkpoint and raises ``Preempted``.
    """
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"--on-nonfinite: expected one of {ON_NONFINITE}, got {on_nonfinite!r}")
    run_dir, started = layout.check_out(run_dir), time.perf_counter()
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = init_distributed(device, ddp_timeout)
    if fsdp:
        distributed.init_single_process_group(device)
    if rank == 0:
        check_folder(run_dir, resume, restart)
        dcp_checkpoint.check_layout(run_dir, fsdp)
    if fsdp:
        distributed.check_shardable(config)
    lock = layout.RunLock(run_dir) if rank == 0 else contextlib.nullcontext()
    with lock:
        if rank == 0:
            layout.clean_temp_files(run_dir)
            dcp_checkpoint.clean_partial(run_dir)
            if restart:
                layout.remove_run_files(run_dir)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.cuda.reset_peak_memory_stats(device)
        if world > 1:
            dist.barrier()  # rank 0 has checked, cleaned (and with restart emptied) the folder
        # outside StopSignals: a stop signal while checkpoints are read and verified ends the process at once
        found = find_checkpoint(config, run_dir, resume, device, rank, world, fsdp)
        with StopSignals() as stop:
            task = load_task(config) if task is None else task
            run = restore(config, run_dir, task, found, device, rank, world, fsdp)
            run.wall_start = started
            try:
                divergence = _loop(
                    run, Progress(run.config, run.step, not quiet and run.rank == 0, bars), on_nonfinite, hooks, stop
                )
                summary = finish(run, divergence)
            except layout.WriteFailed as err:
                raise _write_error(run, err) from err.__cause__
            except RuntimeError as err:
                if world > 1 and any(word in str(err).lower() for word in ("timed out", "timeout")):
                    raise _timeout_error(run, ddp_timeout) from err
                raise
    if divergence is not None:
        raise Diverged(summary)
    return summary


def _write_error(run: Run, err: layout.WriteFailed) -> layout.WriteFailed:
    """A failed checkpoint or log write, saying what is kept and how to go on."""
    if run.saved:
        kept = f"the last good checkpoint, {run.saved[0]} (step {run.saved[1]}), is kept"
    else:
        kept = "no checkpoint was written yet"
    return layout.WriteFailed(f"{err}; {kept}. Free some space, then continue with --resume")


def _timeout_error(run: Run, timeout_s: float) -> RankTimeout:
    silent = silent_ranks(run.rank, run.world, run.step + 1, min(10.0, timeout_s))
    who = f"rank(s) {', '.join(map(str, silent))}" if silent else "another rank"
    saved = f"{run.saved[0]} (step {run.saved[1]})" if run.saved else "none yet"
    return RankTimeout(
        f"rank {run.rank}: {who} stopped answering for --ddp-timeout {timeout_s:g} s during step {run.step + 1} "
        f"(stalled, or killed). Last checkpoint: {saved}; restart the job with --resume"
    )


def _test_die_at_step() -> int | None:
    """The step after which a test asks the process to SIGKILL itself (``LIERE_TEST_DIE_AT_STEP``), if any."""
    value = os.environ.get(TEST_DIE_AT_STEP)
    return None if value is None else int(value)


def _loop(
    run: Run, progress: Progress, on_nonfinite: str, hooks: Sequence[StepHook], stop: StopSignals
) -> Divergence | None:
    """The step loop from ``run.step`` to ``config.steps``; the divergence that stopped it, if any. Raises
    ``Preempted`` after checkpointing when any rank got a stop signal."""
    config, die_at_step = run.config, _test_die_at_step()
    run.process_start = run.step
    workers = min(4, os.cpu_count() or 1) if run.device.type == "cuda" else 0
    run.model.train()
    try:
        for x, y in run.task.batches(run.step, run.rank, run.world, workers):
            if divergence := train_step(run, x, y, on_nonfinite):
                return divergence
            extra: dict[str, float] = {}
            for hook in hooks:
                extra |= hook(run.step, run.model) or {}
            log_step(run, extra, progress)
            progress.update(run.step)
            if run.step % config.ckpt_every == 0 or run.step == config.steps:
                run.save()
            if run.step == die_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if run.step < config.steps and (signum := stop.agreed(run.device)):
                if run.saved is None or run.saved[1] != run.step:
                    run.save()
                run.log.close()
                if run.world > 1:
                    dist.barrier()  # every rank leaves once rank 0's checkpoint is on disk
                raise Preempted(signum, run.step, run.saved[0])
    finally:
        progress.close()
    return None
