"""Shared test fixtures."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import pytest


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
