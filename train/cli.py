"""What every ``python -m train...`` command does with errors: one line naming the problem and the fix.

Exit statuses (``EXIT_STATUSES``, shown in ``--help``): 1 a run failed (divergence, a stalled DDP rank),
2 a usage error (bad options, wrong or busy folders, unusable or refused checkpoints), 3 a file could not be
written (disk full, file too large: the last good checkpoint is kept, ``--resume`` continues once there is
space), 75 the run was stopped by SIGTERM/SIGUSR1 after writing its checkpoint (``EXIT_PREEMPTED``: rerun with
``--resume``), 130 interrupted. Anything else is a bug and keeps its traceback. ``--debug`` shows the traceback
of every error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from liere.encoding import check_positive_int
from models.blocks import WEIGHT_INITS
from train import data, machine
from train.checkpoint import CheckpointError
from train.distributed import RankTimeout
from train.loop import Diverged
from train.preemption import EXIT_PREEMPTED, Preempted
from train.run_dir import WriteFailed

# RunFolderError is a ValueError; OSError: a path that cannot be read or created (a folder, no permission, ...)
USAGE_ERRORS = (ValueError, CheckpointError, OSError)
RUN_FAILURES = (Diverged, RankTimeout)
EXIT_USAGE, EXIT_FAILED, EXIT_WRITE, EXIT_INTERRUPTED = 2, 1, 3, 130
EXIT_STATUSES = (
    "exit status: 0 done; 1 the run failed (diverged, a DDP rank stalled); 2 usage error (options, folders,\n"
    "checkpoints); 3 a file could not be written (e.g. disk full: the last good checkpoint is kept, --resume\n"
    "continues once there is space); 75 preempted: SIGTERM or SIGUSR1 checkpointed after the current step (rerun\n"
    "with --resume); 130 interrupted. --debug shows the traceback of an error."
)


def add_common_options(p: argparse.ArgumentParser) -> None:
    """``--debug`` for every command."""
    p.add_argument("--debug", action="store_true", help="show the full traceback of errors")


def add_preset_overrides(p: argparse.ArgumentParser) -> None:
    """The preset overrides shared by ``train`` and ``train.ab`` (read back by ``preset_overrides``)."""
    p.add_argument("--steps", type=int, help="override the preset's number of optimizer steps")
    p.add_argument("--batch-size", type=int, help="override the preset's global batch size")
    p.add_argument("--lr", type=float, help="override the preset's peak learning rate")
    p.add_argument(
        "--weight-init",
        choices=WEIGHT_INITS,
        help="override the linear-layer init (cpu and smoke ViTs: xavier; otherwise trunc_normal)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        help="side in px the images are resized to (folder:PATH, default 64) or drawn at (arrow)",
    )
    p.add_argument(
        "--split-fractions",
        help="train,val,test fractions of a dataset split by fraction, e.g. 0.7,0.15,0.15 (folder:PATH and\n"
        "digits default 0.8,0.1,0.1; text:PATH and the text corpora 0.9,0.05,0.05)",
    )


def preset_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``preset_config`` keyword arguments from ``add_preset_overrides``' options (None: keep the preset's)."""
    return {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_init": args.weight_init,
        "data_overrides": data_overrides(args),
    }


DATA_FLAGS = {"image_size": "--image-size", "fractions": "--split-fractions"}  # data option -> its flag


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> (0.8, 0.1, 0.1): train, val and test fractions, each > 0, summing to 1."""
    try:
        fractions = tuple(float(part) for part in text.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"--split-fractions: expected train,val,test fractions > 0 summing to 1, got {text!r}")
    return fractions  # type: ignore[return-value]


def data_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The data options ``--image-size`` and ``--split-fractions`` set, refused for a ``--task`` that lacks them."""
    given = {"image_size": args.image_size, "fractions": args.split_fractions}
    options = {key: value for key, value in given.items() if value is not None}
    if "image_size" in options:
        check_positive_int(options["image_size"], "--image-size")
    if "fractions" in options:
        options["fractions"] = parse_fractions(options["fractions"])
    accepted = data.data_options(args.task)
    for key in options:
        if accepted is not None and key not in accepted:
            takes = ", ".join(flag for option, flag in DATA_FLAGS.items() if option in accepted) or "neither"
            raise ValueError(f"{DATA_FLAGS[key]}: dataset {args.task!r} has no such option (it takes: {takes})")
    return options


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by the training commands (``train``, ``train.ab``)."""
    p.add_argument(
        "--threads",
        default="auto",
        help="torch CPU threads per run: a number, or auto (python -m train: the idle cores, cores minus the\n"
        "load average; train.ab: 1 per run, see --jobs; an explicit OMP_NUM_THREADS is kept). Default: auto",
    )
    p.add_argument(
        "--on-nonfinite",
        default="stop",
        choices=("stop", "skip"),
        help="a non-finite loss or gradient: stop the run (default, reported as diverged),\n"
        "or skip that optimizer step (logged in metrics.jsonl and counted in the summary)",
    )
    p.add_argument(
        "--ddp-timeout",
        type=float,
        default=600.0,
        help="under torchrun: seconds a collective waits for a silent rank before the job\n"
        "fails naming it (default: 600)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard parameters, gradients and optimizer state with FSDP2 (under torchrun, or on one\n"
        "process); sharded checkpoints in last.dcp/ that resume on any number of ranks (docs/distributed.md)",
    )
    add_common_options(p)


def train_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``train.loop.train`` keyword arguments given by ``add_run_options`` (and ``--quiet``)."""
    return {
        "quiet": args.quiet,
        "on_nonfinite": args.on_nonfinite,
        "ddp_timeout": args.ddp_timeout,
        "fsdp": args.fsdp,
    }


def set_threads(args: argparse.Namespace) -> str:
    """Apply ``--threads`` (shared among this machine's torchrun processes); print the choice on rank 0."""
    line = machine.set_threads(args.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, flush=True)
    return line


def run(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Call ``main(argv)`` and turn known errors into ``error: ...`` lines and exit codes (see module doc)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        main(args)
    except (*USAGE_ERRORS, *RUN_FAILURES) as err:
        if "--debug" in args:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = EXIT_WRITE if isinstance(err, WriteFailed) else EXIT_USAGE
        sys.exit(EXIT_FAILED if isinstance(err, RUN_FAILURES) else code)
    except Preempted as err:
        print(f"preempted: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    except KeyboardInterrupt:
        if "--debug" in args:
            raise
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
