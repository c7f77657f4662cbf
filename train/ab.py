"""A/B runs: train one model with several position encodings under identical seeds, data and budget.

    python -m train.ab                                   # arrow task, 6 encodings, cpu preset (~10 min on 2 cores)
    python -m train.ab --task austen --preset gpu --seeds 0,1,2
    torchrun --nproc_per_node=8 -m train.ab --task cifar100 --preset paper --out runs/c100

Prints a markdown table (encoding, parameters, final test metric as mean ± std over seeds, step time and
its ratio to the first encoding) and writes into the run folder: ``results.md`` (the table),
``results.json`` (configs, per-seed metrics, data source, device, versions, wall time and, per run, the
relative paths of its folder, checkpoint and metrics log plus the model spec that rebuilds it:
``train.checkpoint.load_model(folder / run["checkpoint"])``), ``curves.png``, ``final.png`` and one
sub-folder per (encoding, seed) run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from train import checkpoint, plots
from train.loop import init_distributed, resolve_device, run_guard, train
from train.presets import PRESETS, RunConfig, is_text, preset_config
from train.tasks import Task, load_task, with_encoding

IMAGE_ENCODINGS = "none,abs,axial-rope,rope-mixed,liere8,liere64"
TEXT_ENCODINGS = "rope,rope-mixed,liere8,liere64"
TASKS = (
    "images: arrow (default), fashion-mnist, cifar10, cifar100, clips3d, digits, folder:PATH\n"
    "text: austen, shakespeare, pydoc, text:PATH"
)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; ``"0-4"`` -> [0, ..., 4] (a count of seeds); ``"7"`` -> [7]."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if not re.fullmatch(r"\d+(-\d+)?", part):
            raise ValueError(f"--seeds: expected non-negative ints or ranges like '0,1,2' or '0-2', got {text!r}")
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: give at least one seed and no duplicates, got {text!r}")
    return seeds


def run_name(encoding: str, seed: int) -> str:
    """Folder name of one run, e.g. ``liere64_init=uniform-s0``."""
    return f"{re.sub(r'[^A-Za-z0-9_.=+-]', '_', encoding)}-s{seed}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.ab", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--task", default="arrow", help=f"dataset: {TASKS}")
    p.add_argument(
        "--encodings",
        help=f"comma-separated liere factory specs (e.g. liere8, liere64:init=uniform); the first is the\n"
        f"step-time reference. Default: {IMAGE_ENCODINGS} (text tasks: {TEXT_ENCODINGS})",
    )
    p.add_argument(
        "--preset",
        default="cpu",
        choices=sorted(PRESETS),
        help="model size, data size and budget: smoke (seconds, tests), cpu (default: tiny ViT, 48 px arrow,\n"
        "~10 min on 2 cores), gpu (ViT-S-like, 108 px arrow), paper (ViT-B, 108 px arrow, 40k steps)",
    )
    p.add_argument("--seeds", default="0", help="training seeds: '0,1,2', a range '0-4', or one seed (default: 0)")
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto (cuda if available)"
    )
    p.add_argument("--steps", type=int, help="override the preset's optimizer steps")
    p.add_argument("--batch-size", type=int, help="override the preset's global batch size")
    p.add_argument("--lr", type=float, help="override the preset's peak learning rate")
    p.add_argument("--out", help="run folder (default: runs/ab-<task>-<timestamp>)")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the run folder (--out, else the newest runs/ab-<task>-*): skip finished runs,\n"
        "continue interrupted ones from their checkpoints",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _run_folder(args: argparse.Namespace) -> Path:
    stem = f"ab-{re.sub(r'[^A-Za-z0-9_.-]', '_', args.task)}"
    if args.out:
        return Path(args.out)
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


def _finished(run_dir: Path, config_hash: str) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else None
    return summary if summary is not None and summary["config_hash"] == config_hash else None


def summarize(runs: Sequence[dict[str, Any]], encodings: Sequence[str]) -> list[dict[str, Any]]:
    """Per encoding: params, test/val metric mean and std over seeds, step time and its ratio to the first."""
    rows = []
    for encoding in encodings:
        mine = [r for r in runs if r["encoding"] == encoding]
        test = [r["test"][r["metric"]] for r in mine]
        val = [r["val"][r["metric"]] for r in mine]
        rows.append({
            "encoding": encoding, "params": mine[0]["params"], "seeds": len(mine),
            "mean": statistics.fmean(test), "std": statistics.stdev(test) if len(test) > 1 else 0.0,
            "val_mean": statistics.fmean(val), "step_time_ms": statistics.fmean(r["step_time_ms"] for r in mine),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in mine),
        })  # fmt: skip
    for row in rows:
        row["step_time_ratio"] = row["step_time_ms"] / rows[0]["step_time_ms"]
    return rows


def table(rows: Sequence[dict[str, Any]], metric: str, memory_kind: str) -> str:
    """Markdown table of ``summarize`` rows (accuracy in percent)."""
    scale, unit = (100, " (%)") if metric == "accuracy" else (1, "")
    digits = 1 if metric == "accuracy" else 3
    memory = "peak GPU MiB" if memory_kind == "cuda_allocated" else "process peak RSS MiB"
    lines = [
        f"| encoding | params | test {metric}{unit} | val {metric}{unit} | step ms | x first | {memory} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        spread = f" ± {scale * r['std']:.{digits}f}" if r["seeds"] > 1 else ""
        lines.append(
            f"| {r['encoding']} | {r['params']:,} | {scale * r['mean']:.{digits}f}{spread} | "
            f"{scale * r['val_mean']:.{digits}f} | {r['step_time_ms']:.1f} | {r['step_time_ratio']:.2f} | "
            f"{r['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the A/B comparison described by ``argv`` (see ``--help``); return the results.json content."""
    args = parser().parse_args(argv)
    wall_start = time.perf_counter()
    seeds = parse_seeds(args.seeds)
    encodings = [e.strip() for e in (args.encodings or (TEXT_ENCODINGS if is_text(args.task) else IMAGE_ENCODINGS))
                 .split(",") if e.strip()]  # fmt: skip
    names = [run_name(e, 0) for e in encodings]
    if not encodings or len(set(names)) != len(names):
        raise ValueError(f"--encodings: give distinct specs (folder names must differ), got {args.encodings!r}")
    base = preset_config(args.preset, args.task, encoding=encodings[0], device=args.device, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, compile=args.compile or None)  # fmt: skip
    rank, world = init_distributed(resolve_device(args.device))
    out = Path(_shared(str(_run_folder(args))))
    configs = {(e, s): RunConfig(**(base.to_dict() | {"encoding": e, "seed": s})) for e in encodings for s in seeds}
    task = load_task(base)
    check_encodings(task, [configs[e, seeds[0]] for e in encodings])
    if rank == 0:
        print(f"data: {task.source}\nrun folder: {out}", flush=True)

    runs = []
    for (encoding, seed), config in configs.items():
        run_dir = out / run_name(encoding, seed)
        run_task = with_encoding(task, config)
        done = _finished(run_dir, checkpoint.config_hash(run_guard(config, world))) if args.resume else None
        summary = done or train(config, run_dir, task=run_task, resume=args.resume, quiet=args.quiet)
        runs.append({
            "encoding": encoding, "seed": seed, "run_dir": run_dir.name,
            "checkpoint": f"{run_dir.name}/last.pt", "metrics_log": f"{run_dir.name}/metrics.jsonl", **summary,
        })  # fmt: skip
        if rank == 0:
            metric = summary["test"][summary["metric"]]
            print(f"[ab] {encoding} seed {seed}: test {summary['metric']} {metric:.4f}", flush=True)

    metric = runs[0]["metric"]
    rows = summarize(runs, encodings)
    results = {
        "task": args.task, "preset": args.preset, "encodings": encodings, "seeds": seeds, "metric": metric,
        "higher_is_better": runs[0]["higher_is_better"], "data_source": task.source, "device": runs[0]["device"],
        "world_size": runs[0]["world_size"], "torch_version": torch.__version__, "base_config": base.to_dict(),
        "runs": runs, "summary": rows, "table": table(rows, metric, runs[0]["peak_memory_kind"]),
        "wall_time_s": time.perf_counter() - wall_start,
    }  # fmt: skip
    if rank == 0:
        _write(out, results)
    return results


def _write(out: Path, results: dict[str, Any]) -> None:
    """results.json, results.md and the plots; prints the table and the wall time."""
    metric = results["metric"]
    paths = [{**r, "metrics_log": out / r["metrics_log"]} for r in results["runs"]]
    plots.learning_curves(paths, metric, out / "curves.png")
    plots.final_metric_bars(results["summary"], metric, "test", out / "final.png")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results["table"] + "\n")
    print(f"\n{results['table']}\n\ndata: {results['data_source']}\ndevice: {results['device']}, "
          f"wall time {results['wall_time_s']:.0f} s\nwritten to {out}", flush=True)  # fmt: skip


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        sys.exit(f"error: {err}")
