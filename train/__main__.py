"""Train one run: ``python -m train --task arrow --encoding liere8 --preset cpu --out runs/arrow-liere8``.

Multi-GPU / multi-node: ``torchrun --nproc_per_node=8 -m train ...`` (DistributedDataParallel; the batch
size is the global batch), ``--fsdp`` for FSDP2 sharding (docs/distributed.md). ``--resume`` continues the run in
``--out`` exactly where its checkpoint left off. SIGTERM/SIGUSR1 checkpoint after the current step and exit with
status 75.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from train import cli, data, distributed
from train.loop import train
from train.presets import PRESETS, preset_config
from train.summaries import RunSummary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description=__doc__.split("\n\n")[0],
        epilog=cli.EXIT_STATUSES,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument(
        "--task", default=data.DEFAULT_DATASET, help="dataset (`python -m train.data list`; default: %(default)s)"
    )
    p.add_argument(
        "--encoding", default="liere8", help="liere factory spec, e.g. rope-mixed, liere64 (default: liere8)"
    )
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="model/data/budget preset (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="training seed: init, data order, dropout (default: 0)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, summary.json)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    cli.add_preset_overrides(p)
    p.add_argument("--eval-every", type=int, help="override: evaluate on val every N steps")
    p.add_argument("--ckpt-every", type=int, help="override: checkpoint every N steps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument(
        "--restart", action="store_true", help="train again from step 0 in --out, replacing the run files there"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    cli.add_run_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> RunSummary:
    """Parse ``argv``, train, print the summary's metrics and return the summary."""
    args = parser().parse_args(argv)
    config = preset_config(
        args.preset,
        args.task,
        encoding=args.encoding,
        seed=args.seed,
        device=args.device,
        **cli.preset_overrides(args),
        eval_every=args.eval_every,
        ckpt_every=args.ckpt_every,
        compile=args.compile or None,
    )
    cli.set_threads(args)
    try:
        summary = train(config, args.out, resume=args.resume, restart=args.restart, **cli.train_options(args))
    finally:
        distributed.leave_process_group()
    keys = ("final_loss", "val", "test", "params", "step_time_ms", "peak_memory_mb", "peak_memory_kind")
    print(json.dumps({k: getattr(summary, k) for k in keys}))
    return summary


if __name__ == "__main__":
    cli.run(main)
