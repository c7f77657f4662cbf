"""Per-forward rotations shared by the adapters, kept off the modules.

An adapted model computes its rotations once per forward and its attention layers read them. Storing
them on a module breaks ``deepcopy`` (EMA copies), pickling, threads and ``nn.DataParallel`` replicas, and
keeps them (and their autograd graph) alive after the forward. Instead a forward opens a scope
(``open_scope`` / ``close_scope``, or ``with rotation_scope() as scope``) whose ``ForwardRotations`` lives in
a thread-local stack: each thread sees its own forward's rotations, and they are dropped when it ends.
Code that runs a layer outside the forward (activation checkpointing's recompute in the backward) passes
the scope along explicitly and re-enters it with ``rotation_scope(scope)``. ``torch.compile`` (and
``torch.export``) trace through it without graph breaks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch.fx import Proxy

from liere.rotations import Rotations

_LOCAL = threading.local()


class ForwardRotations:
    """The rotations of one forward pass, by token count.

    ``compute(n)`` (optional) makes the rotations of the last ``n`` tokens on demand; ``put`` stores
    ready-made rotations (their ``num_positions`` is the key). Each count is computed at most once.
    """

    def __init__(self, compute: Callable[[int], Rotations] | None = None) -> None:
        self.compute = compute
        self.by_length: dict[int, Rotations] = {}

    def put(self, rot: Rotations) -> None:
        self.by_length[int(rot.num_positions)] = rot  # int: shapes are tensors under jit.trace

    def get(self, num_tokens: int) -> Rotations:
        """Rotations for ``num_tokens`` tokens (prefix tokens included); under ``torch.fx`` symbolic tracing the
        count is a ``Proxy`` and the forward's one set of rotations is returned."""
        if isinstance(num_tokens, Proxy) and len(self.by_length) == 1:
            return next(iter(self.by_length.values()))
        num_tokens = int(num_tokens)
        if num_tokens not in self.by_length:
            if self.compute is None:
                have = sorted(self.by_length)
                raise RuntimeError(f"no rotations for {num_tokens} tokens in this forward (have {have})")
            self.by_length[num_tokens] = self.compute(num_tokens)
        return self.by_length[num_tokens]


def _stack() -> list[ForwardRotations]:
    if not hasattr(_LOCAL, "stack"):
        _LOCAL.stack = []
    return _LOCAL.stack


def open_scope(scope: ForwardRotations | None = None) -> ForwardRotations:
    """Make ``scope`` (default: a new, empty one) this thread's current rotations; returns it."""
    scope = ForwardRotations() if scope is None else scope
    _stack().append(scope)
    return scope


def close_scope() -> None:
    """Leave this thread's innermost scope (its rotations are released)."""
    stack = _stack()
    if stack:
        stack.pop()


@contextmanager
def rotation_scope(scope: ForwardRotations | None = None) -> Iterator[ForwardRotations]:
    """``open_scope(scope)`` for the duration of the ``with`` block."""
    scope = open_scope(scope)
    try:
        yield scope
    finally:
        close_scope()


def current_scope() -> ForwardRotations:
    """This thread's innermost scope; raises when no adapted forward is running."""
    stack = _stack()
    if not stack:
        raise RuntimeError("rotations not computed: call the adapted model (not one of its layers alone)")
    return stack[-1]
