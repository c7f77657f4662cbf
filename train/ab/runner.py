"""A/B runs: train one model with several position encodings under identical seeds, data and budget.

    python -m train.ab                                   # arrow task, 6 encodings, cpu preset (~4 min on 2 cores)
    python -m train.ab --task austen --preset gpu --seeds 0,1,2
    python -m train.ab --seeds 0-2 --data-fractions 0.1,0.3,1.0 --reference rope-mixed
    torchrun --nproc_per_node=8 -m train.ab --task cifar100 --preset paper --out runs/c100

Prints a markdown table (encoding, parameters, final test metric as mean [95% bootstrap CI] over seeds,
Δ and paired p-values against a reference encoding, step time and its ratio to the first encoding) and
writes into the run folder: ``results.md`` (the table), ``results.json`` (configs, per-seed metrics, split
sizes (``data_sizes``) and the test examples or tokens scored (``scored``), data source, device, versions,
wall time and, per run, the relative paths of its folder, checkpoint and metrics log plus the model spec that
rebuilds it: ``train.run_checkpoint.load_model(folder / run["checkpoint"])``), ``report.md``
(``train.ab.report``), ``curves.png``, ``final.png``, the evaluation plots and one sub-folder per
(encoding, seed[, fraction]) run holding ``evaluation.json`` / ``test_correct.pt`` (``train.ab.evaluate``).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from liere.factory import default_comparison, split_specs
from train import checkpoint, cli, data, machine, run_checkpoint
from train import run_dir as layout
from train.ab import evaluate, plots, report
from train.distributed import init_distributed, resolve_device
from train.loop import Diverged, find_checkpoint, run_guard, train
from train.presets import PRESETS, RunConfig, is_text, preset_config
from train.progress import format_duration
from train.summaries import AbResults, AbRun, RunSummary
from train.tasks import Task, load_task, with_encoding

MAX_SEEDS = 1000


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; ``"0-4"`` -> [0, ..., 4] (a count of seeds); ``"7"`` -> [7]. At most ``MAX_SEEDS``."""
    spans: list[tuple[int, int]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if not re.fullmatch(r"\d+(-\d+)?", part):
            raise ValueError(f"--seeds: expected non-negative ints or ranges like '0,1,2' or '0-2', got {text!r}")
        lo, _, hi = part.partition("-")
        spans.append((int(lo), int(hi or lo)))
    if any(lo > hi for lo, hi in spans):
        raise ValueError(f"--seeds: a range must go upwards (like '0-2'), got {text!r}")
    if (count := sum(hi - lo + 1 for lo, hi in spans)) > MAX_SEEDS:
        raise ValueError(f"--seeds: {text!r} asks for {count} seeds; at most {MAX_SEEDS} (each seed is a full run)")
    if max((hi for _, hi in spans), default=0) >= 2**31:
        raise ValueError(f"--seeds: seeds must be below 2**31, got {text!r}")
    seeds = [s for lo, hi in spans for s in range(lo, hi + 1)]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: give at least one seed and no duplicates, got {text!r}")
    return seeds


def default_encodings(task: str) -> list[str]:
    """The registry's default comparison (``liere.factory.default_comparison``) for ``task``'s number of axes."""
    return default_comparison(1 if is_text(task) else 2)


def split_encoding(text: str) -> tuple[str, dict[str, Any]]:
    """An ``--encodings`` item -> (factory spec, model options): ``"liere8:init=uniform@unit"`` ->
    ``("liere8:init=uniform", {"unit_coords": True})``; ``@unit`` trains the ViT on ``[0, 1]`` patch coordinates
    (spacing ``1/(n-1)``, the LieRE paper's convention) instead of patch indices."""
    spec, at, suffix = text.partition("@")
    if at and suffix != "unit":
        raise ValueError(f"--encodings: the only suffix is '@unit' ([0, 1] patch coordinates), got {text!r}")
    return spec, {"unit_coords": True} if at else {}


def _config(base: RunConfig, encoding: str, seed: int, fraction: float) -> RunConfig:
    spec, model_options = split_encoding(encoding)
    changes = {"encoding": spec, "seed": seed, "train_fraction": fraction}
    return RunConfig(**(base.to_dict() | changes | {"model_options": base.model_options | model_options}))


def run_name(encoding: str, seed: int, fraction: float = 1.0) -> str:
    """Folder name of one run, e.g. ``liere64_init=uniform-s0`` (``liere8-f0.1-s0`` on 10% of the data)."""
    part = "" if fraction == 1.0 else f"-f{fraction:g}"
    return f"{re.sub(r'[^A-Za-z0-9_.=+-]', '_', encoding)}{part}-s{seed}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.ab",
        description=__doc__.split("\n\n")[0],
        epilog=cli.EXIT_STATUSES,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--task", default=data.DEFAULT_DATASET, help=f"dataset, one of:\n{data.help_lines()}")
    p.add_argument(
        "--encodings",
        help=f"liere factory specs separated by commas (e.g. 'axial-rope,liere8:init=uniform,rot_dim=16': an item\n"
        f"with key=value before any ':' is an option of the spec before it) or by ';'; the first is the step-time\n"
        f"reference; a suffix @unit trains that one on [0, 1] patch coordinates (ViT unit_coords).\n"
        f"Default: liere.factory.default_comparison: {','.join(default_comparison(2))} for images,\n"
        f"{','.join(default_comparison(1))} for text",
    )
    p.add_argument(
        "--preset",
        default="cpu",
        choices=sorted(PRESETS),
        help="model size, data size and budget: smoke (seconds, tests), cpu (default: tiny ViT, 48 px arrow,\n"
        "~4 min on an idle 2-core CPU), gpu (ViT-S-like, 108 px arrow), paper (ViT-B, 108 px arrow, 40k steps)",
    )
    p.add_argument("--seeds", default="0", help="training seeds: '0,1,2', a range '0-4', or one seed (default: 0)")
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto (cuda if available)"
    )
    cli.add_preset_overrides(p)
    p.add_argument(
        "--eval-samples", type=int, help="override the preset's val/test examples (tokens for text) per evaluation"
    )
    p.add_argument("--out", help="run folder (default: runs/ab-<task>-<timestamp>)")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the run folder (--out, else the newest runs/ab-<task>-*): skip finished runs,\n"
        "continue interrupted ones from their checkpoints",
    )
    p.add_argument(
        "--evaluate",
        default="default",
        help="evaluations after each run: shuffle, extrapolate (vision), length (text), or 'none'.\n"
        "Default: shuffle,extrapolate for vision, length for text (see train.ab.evaluate)",
    )
    p.add_argument("--extrapolate", default="1.0,1.5,2.0", help="image scale factors to test (default: 1.0,1.5,2.0)")
    p.add_argument("--lengths", default="1,2,4", help="text: context multiples to test (default: 1,2,4)")
    p.add_argument(
        "--data-fractions",
        default="1.0",
        help="train every encoding on these fractions of the training set, e.g. 0.1,0.3,1.0 (seeded,\n"
        "nested subsets, the same for every encoding); the main table uses the largest (default: 1.0)",
    )
    p.add_argument("--reference", help=f"encoding the paired tests compare against (default: {report.REFERENCE_HELP})")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    p.add_argument(
        "--jobs",
        default="auto",
        help="CPU runs trained at once, each in its own process: a number, or auto (default: one per idle\n"
        "core, each with 1 thread unless --threads says otherwise, so results do not depend on the core count;\n"
        "always 1 on CUDA and under torchrun)",
    )
    cli.add_run_options(p)
    return p


def _run_folder(args: argparse.Namespace) -> Path:
    stem = f"ab-{re.sub(r'[^A-Za-z0-9_.-]', '_', args.task)}"
    if args.out is not None:
        return layout.check_out(args.out)
    if args.resume:
        previous = sorted(Path("runs").glob(f"{stem}-*"))
        if not previous:
            raise ValueError(f"--resume: no previous run folder runs/{stem}-* found; pass --out")
        return previous[-1]
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _shared(value: Any) -> Any:
    """Rank 0's ``value`` on every process (under torchrun), e.g. a timestamped folder name."""
    if dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def check_encodings(task: Task, configs: Sequence[RunConfig]) -> None:
    """Build every encoding's model once (on CPU, then dropped) so that a bad spec fails before any training."""
    for config in configs:
        try:
            with_encoding(task, config).build_model()
        except (ValueError, TypeError) as err:
            raise ValueError(f"--encodings: {config.encoding!r} does not work for task {config.task!r}: {err}") from err


def check_out_folder(out: Path, resume: bool) -> None:
    """Refuse, before any data is loaded, a fresh A/B run into a folder that holds one."""
    if resume or not out.is_dir():
        return
    if (out / layout.RESULTS_JSON).exists() or any(layout.has_run(d) for d in out.iterdir() if d.is_dir()):
        raise layout.RunExistsError(f"{out} already holds an A/B run; pass --resume to continue it, or another --out")


def _finished(run_dir: Path, config_hash: str) -> RunSummary | None:
    """The summary of a run finished earlier (or diverged) under the same config, else None."""
    path = run_dir / layout.SUMMARY
    if not path.is_file():
        return None
    try:
        summary = RunSummary.load(path)
    except layout.RunFolderError as err:
        layout.warn(f"{err}; the run is continued from its checkpoint to rebuild it")
        return None
    return summary if summary.config_hash == config_hash else None


def _train_or_reuse(
    config: RunConfig, run_dir: Path, task: Task, args: argparse.Namespace, world: int, bars: bool
) -> tuple[RunSummary, bool]:
    """``(summary, reused)``: a finished run's summary under ``--resume``, else train it (a diverged run gives
    its diverged summary); ``bars``: ``train``'s progress bars."""
    done = _finished(run_dir, checkpoint.config_hash(run_guard(config, world, args.fsdp))) if args.resume else None
    if done is not None:
        return done, True
    try:
        return train(config, run_dir, task=task, resume=args.resume, bars=bars, **cli.train_options(args)), False
    except Diverged as err:
        print(f"[ab] {config.encoding} seed {config.seed}: {err}", file=sys.stderr, flush=True)
        return err.summary, False


def main(argv: Sequence[str] | None = None) -> AbResults:
    """Run the A/B comparison described by ``argv`` (see ``--help``); return the results.json content."""
    args = parser().parse_args(argv)
    wall_start = time.perf_counter()
    seeds = parse_seeds(args.seeds)
    encodings = default_encodings(args.task) if args.encodings is None else split_specs(args.encodings)
    names = [run_name(e, 0) for e in encodings]
    if not encodings or len(set(names)) != len(names):
        raise ValueError(f"--encodings: give distinct specs (folder names must differ), got {args.encodings!r}")
    evaluations = evaluate.parse_evaluations(args.evaluate, args.task)
    factors = evaluate.parse_list(args.extrapolate, "--extrapolate")
    multiples = evaluate.parse_list(args.lengths, "--lengths", int)
    fractions = sorted(set(evaluate.parse_list(args.data_fractions, "--data-fractions")))
    if fractions[-1] > 1:
        raise ValueError(f"--data-fractions: fractions must be in (0, 1], got {args.data_fractions!r}")
    report.resolve_reference(args.task, encodings, args.reference)  # a bad --reference fails before training
    base = preset_config(
        args.preset,
        args.task,
        encoding=split_encoding(encodings[0])[0],
        device=args.device,
        **cli.preset_overrides(args),
        compile=args.compile or None,
        eval_samples=args.eval_samples,
    )
    device = resolve_device(args.device)
    runs = len(encodings) * len(seeds) * len(fractions)
    if device.type == "cpu" and "RANK" not in os.environ:
        jobs, threads, line = machine.plan_jobs(args.jobs, args.threads, runs)
        torch.set_num_threads(threads)
        print(line, flush=True)
    else:
        jobs = 1
        cli.set_threads(args)
    rank, world = init_distributed(device, args.ddp_timeout)
    out = Path(_shared(str(_run_folder(args))))
    if rank == 0:
        check_out_folder(out, args.resume)
    with layout.RunLock(out) if rank == 0 else contextlib.nullcontext():
        try:
            results = _run_all(
                args, base, out, encodings, seeds, fractions, (evaluations, factors, multiples), rank, world, jobs
            )
        except (KeyboardInterrupt, RuntimeError, OSError):  # not for usage errors (ValueError)
            if rank == 0:
                print(
                    f"\n[ab] stopped before the end; finished runs are kept in {out}. Continue with the same "
                    f"command plus: --out {out} --resume",
                    file=sys.stderr,
                    flush=True,
                )
            raise
    results.wall_time_s += time.perf_counter() - wall_start
    if rank == 0:
        rows = report.summarize(results, out, args.reference)
        results.summary = [row.to_dict() for row in rows]
        results.table = report.main_table(rows, results.metric, results.runs[0].peak_memory_kind)
        results.scored = report.scored_counts(results, report.run_evaluations(out, results.main_runs()))
        _write(out, results, args.reference)
    return results


@dataclass(frozen=True)
class _Job:
    """One run of the A/B grid: its config, folder and whether to evaluate it (main-fraction runs)."""

    encoding: str
    seed: int
    fraction: float
    config: RunConfig
    run_dir: Path
    evaluate: bool


def _run_one(
    job: _Job, task: Task, args: argparse.Namespace, evaluation: tuple, rank: int, world: int, bars: bool = True
) -> tuple[AbRun, bool, float]:
    """Train (or reuse) one run and, on rank 0, evaluate it: ``(run, reused, seconds spent by earlier
    processes on it)``; ``bars``: progress bars (off in worker processes, whose bars would interleave)."""
    tick = time.perf_counter()
    run_task = with_encoding(task, job.config)
    summary, reused = _train_or_reuse(job.config, job.run_dir, run_task, args, world, bars)
    earlier = max(0.0, summary.wall_time_s - (time.perf_counter() - tick))
    fresh = not reused or not (job.run_dir / layout.EVALUATION).is_file()
    saved = layout.LAST_DCP if args.fsdp else layout.LAST
    if rank == 0 and job.evaluate and fresh and summary.test_value is not None:
        model = run_checkpoint.load_model(job.run_dir / saved)
        evaluate.evaluate_run(model, run_task, job.run_dir, *evaluation, device=summary.device)
    paths = {"checkpoint": f"{job.run_dir.name}/{saved}", "metrics_log": f"{job.run_dir.name}/{layout.METRICS}"}
    run = AbRun(
        **(summary.to_dict() | paths),
        encoding=job.encoding,
        seed=job.seed,
        fraction=job.fraction,
        run_dir=job.run_dir.name,
    )  # paths relative to the A/B folder, which may move
    return run, reused, earlier


_worker_task: Task | None = None


def _start_worker(task: Task, threads: int) -> None:
    global _worker_task
    torch.set_num_threads(threads)
    _worker_task = task


def _run_in_worker(job: _Job, args: argparse.Namespace, evaluation: tuple) -> tuple[AbRun, bool, float]:
    assert _worker_task is not None, "_start_worker sets the task"
    return _run_one(job, _worker_task, args, evaluation, 0, 1, bars=False)


def _execute(
    jobs: list[_Job], task: Task, args: argparse.Namespace, evaluation: tuple, rank: int, world: int, workers: int
) -> Iterator[tuple[int, tuple[AbRun, bool, float]]]:
    """``(position in jobs, _run_one's result)`` as runs finish: in order, or ``workers`` at once in
    separate processes (each with this process's torch thread count)."""
    if workers == 1:
        for position, job in enumerate(jobs):
            yield position, _run_one(job, task, args, evaluation, rank, world)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process whose torch threads already ran
    init = (task, torch.get_num_threads())
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=init) as pool:
        futures = {pool.submit(_run_in_worker, job, args, evaluation): i for i, job in enumerate(jobs)}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _run_all(
    args: argparse.Namespace,
    base: RunConfig,
    out: Path,
    encodings: list[str],
    seeds: list[int],
    fractions: list[float],
    evaluation: tuple,
    rank: int,
    world: int,
    workers: int = 1,
) -> AbResults:
    """Train (or reuse, under --resume) every run, ``workers`` at once, and evaluate the main-fraction ones."""
    jobs = [
        _Job(e, s, f, _config(base, e, s, f), out / run_name(e, s, f), f == fractions[-1])
        for f in fractions
        for e in encodings
        for s in seeds
    ]
    if args.resume and rank == 0 and not args.fsdp:  # refuse bad or foreign checkpoints before the data loads
        for job in jobs:  # (--fsdp: DCP checkpoints are checked collectively, in train)
            if not (job.run_dir / layout.SUMMARY).is_file():
                find_checkpoint(job.config, job.run_dir, True, torch.device("cpu"), rank, world)
    task = load_task(base)
    check_encodings(task, [j.config for j in jobs if j.seed == seeds[0] and j.fraction == fractions[-1]])
    if rank == 0:
        print(f"data: {task.source}\nrun folder: {out}", flush=True)
    done: dict[int, AbRun] = {}
    earlier, trained, started = 0.0, 0, time.perf_counter()
    finished = _execute(jobs, task, args, evaluation, rank, world, min(workers, len(jobs)))
    for index, (position, (run, reused, earlier_s)) in enumerate(finished, start=1):
        done[position], earlier, trained = run, earlier + earlier_s, trained + (not reused)
        if rank != 0:
            continue
        shown = "diverged" if run.test_value is None else f"test {run.metric} {run.test_value:.4f}"
        print(f"[ab] {index}/{len(jobs)} {run.encoding} seed {run.seed} fraction {run.fraction:g}: {shown}", flush=True)
        if index < len(jobs) and not reused:
            pace = (time.perf_counter() - started) / trained
            left = len(jobs) - index
            print(
                f"[ab] about {format_duration(pace * left)} left for {left} more run(s) at the pace so far "
                "(larger encodings take longer)",
                flush=True,
            )
    runs = [done[i] for i in range(len(jobs))]
    first = runs[0]
    return AbResults(
        task=args.task,
        preset=args.preset,
        encodings=encodings,
        seeds=seeds,
        fractions=fractions,
        evaluations=evaluation[0],
        metric=first.metric,
        higher_is_better=first.higher_is_better,
        data_source=task.source,
        device=first.device,
        world_size=first.world_size,
        torch_version=torch.__version__,
        base_config=base.to_dict(),
        runs=runs,
        wall_time_s=earlier,
        threads=torch.get_num_threads(),
        jobs=workers,
        cpu=machine.cpu_model(),
        data_sizes=data.split_sizes(task.splits),
        data_unit=data.size_unit(task.splits),
    )


def _write(out: Path, results: AbResults, reference: str | None) -> None:
    """results.json, results.md, report.md and the plots; prints the table and the wall time."""
    paths = [{"encoding": r.encoding, "metrics_log": out / r.metrics_log} for r in results.main_runs()]
    plots.learning_curves(paths, results.metric, out / layout.CURVES, report.chance_level(results))
    layout.write_json(out / layout.RESULTS_JSON, results.to_dict())
    layout.write_text(out / layout.RESULTS_MD, results.table + "\n")
    report.write_report(out, reference)
    print(
        f"\n{results.table}\n\ndata: {results.data_source}\ndevice: {results.device}, "
        f"wall time {results.wall_time_s:.0f} s (all parts of the run)\nwritten to {out}",
        flush=True,
    )


if __name__ == "__main__":
    cli.run(main)
