"""Preemption: SIGTERM (Kubernetes, SLURM at the time limit) or SIGUSR1 (SLURM's warning,
``#SBATCH --signal=USR1@90``) lets the step in progress finish, writes a checkpoint and stops the run with
``EXIT_PREEMPTED``; ``--resume`` continues it exactly where it stopped. Under torchrun the ranks agree on the step to
stop at (a max all-reduce of the signal after every step), so a signal to any one rank stops them all together.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "a temporary failure, the user is invited to retry"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(RuntimeError):
    """The run stopped on a signal after writing a checkpoint; rerun the same command with ``--resume``."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}. "
            f"Continue with the same command plus --resume (exit status {EXIT_PREEMPTED})"
        )
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopSignals:
    """Context manager: while inside, SIGTERM and SIGUSR1 only record that a stop was asked (``requested``); the
    previous handlers come back on exit. Outside the main thread (where handlers cannot be set) it does nothing."""

    def __init__(self) -> None:
        self.requested = 0  # the signal number received, 0 for none
        self._previous: dict[int, object] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def agreed(self, device: torch.device) -> int:
        """The stop signal any rank received (0: none); a collective under torchrun, so all ranks answer alike."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([self.requested], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
