"""Shared test fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread():
    """Train in this process with the 1 thread of the reference runs, so weights compare bitwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_in_threads() -> Callable[[Callable[[object], None], Iterable[object]], list[BaseException]]:
    """``run(fn, args)``: ``fn(arg)`` in one thread per ``arg``, all at once; returns what they raised."""

    def run(fn: Callable[[object], None], args: Iterable[object]) -> list[BaseException]:
        errors: list[BaseException] = []

        def guarded(arg: object) -> None:
            try:
                fn(arg)
            except BaseException as e:  # noqa: BLE001 - handed back to the test
                errors.append(e)

        threads = [threading.Thread(target=guarded, args=(arg,)) for arg in args]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return errors

    return run


REPO = Path(__file__).resolve().parents[1]


def _python_env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture
def python_module() -> Callable[..., subprocess.CompletedProcess]:
    """``python_module(module, *args)``: run ``python -m module args`` from the repository root (one thread)."""

    def run(module: str, *args: object) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", module, *map(str, args)]
        return subprocess.run(cmd, cwd=REPO, env=_python_env(), capture_output=True, text=True, timeout=300)

    return run


@pytest.fixture
def failing_command(capsys) -> Iterator[Callable[..., subprocess.CompletedProcess]]:
    """``failing_command(main, *args)``: a command-line ``main`` run in this process the way ``train.cli.run`` runs
    it, expected to fail: its exit status, stdout and stderr. The torch thread count the command sets is restored."""
    from train import cli

    threads = torch.get_num_threads()

    def run(main: Callable[[list[str]], object], *args: object) -> subprocess.CompletedProcess:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit:
            cli.run(main, list(map(str, args)))
        printed = capsys.readouterr()
        return subprocess.CompletedProcess(args, exit.value.code, printed.out, printed.err)

    yield run
    torch.set_num_threads(threads)
