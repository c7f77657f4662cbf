"""``torch.fx`` symbolic tracing (``symbolic_trace``, torchvision's ``create_feature_extractor``, timm's FX features).

Symbolic tracing runs the Python code once with ``Proxy`` stand-ins that have no values, shapes or dtypes, so the
library's value checks, shape checks and dtype/device decisions cannot run then. Instead the library records its
work as a few leaf nodes whose run-time code is the eager code itself, so a traced model computes exactly what the
eager model computes (bitwise), on whatever device and dtype it is later moved to:

- an encoding's ``forward`` becomes one node that builds the ``Rotations`` (the encoding stays a submodule of the
  traced graph, so its parameters keep receiving gradients); at trace time it returns a ``TracedRotations``, which
  knows the depth and the number of positions and records layer selection and application as nodes;
- ``Rotations.apply``, ``rotary_attention`` and the additive encodings' ``add_to_tokens`` on a ``Proxy`` become one
  node each.

Coordinates must be a ``Grid`` or a tensor (a ``Proxy`` input is passed through to the node).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.fx import Proxy
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from liere.coords import Grid
from liere.rotations import Rotations

CoordsArg = Tensor | Proxy | tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]


def is_symbolic_tracing() -> bool:
    """True while ``torch.fx`` symbolically traces (not under ``torch.compile`` / ``torch.export``)."""
    return is_fx_symbolic_tracing()


def coords_arg(coords: Tensor | Grid | Proxy) -> CoordsArg:
    """``coords`` as an fx node argument: a ``Grid`` becomes its ``(shape, spacing, offset)`` (see ``as_coords``)."""
    return (coords.shape, coords.spacing, coords.offset) if isinstance(coords, Grid) else coords


def as_coords(arg: CoordsArg) -> Tensor | Grid:
    """Inverse of ``coords_arg``, at run time."""
    return Grid(*arg) if isinstance(arg, tuple) else arg


def find_tracer(module: nn.Module, *values: object) -> Any:
    """The tracer recording ``module``'s call: that of a ``Proxy`` among ``values`` or among ``module``'s parameters
    and buffers as the tracer hands them out; None when nothing is symbolic (then the call can run as is)."""
    found = [v for v in values if isinstance(v, Proxy)]
    for sub in module.modules():
        found += [v for name in (*sub._parameters, *sub._buffers) if isinstance(v := getattr(sub, name), Proxy)]
    return found[0].tracer if found else None


def call_leaf(tracer: Any, fn: Callable[..., Any], *args: object, **kwargs: object) -> Proxy:
    """Record ``fn(*args, **kwargs)`` as one ``call_function`` node (modules become references to submodules)."""
    return tracer.create_proxy("call_function", fn, args, kwargs)


def encoding_rotations(encoding: nn.Module, coords: CoordsArg, num_prefix_tokens: int) -> Rotations:
    """Run time of a traced encoding call: ``encoding(coords, num_prefix_tokens)``."""
    return encoding(as_coords(coords), num_prefix_tokens)


def encoding_add_to_tokens(encoding: nn.Module, x: Tensor, coords: CoordsArg) -> Tensor:
    """Run time of a traced ``encoding.add_to_tokens(x, coords)``."""
    return encoding.add_to_tokens(x, as_coords(coords))


def stored_rotations(head_dim: int, tensors: dict[str, Tensor]) -> Rotations:
    """Run time of ``Rotations`` computed at trace time (fixed encodings): rebuilt from their stored tensors."""
    return Rotations(head_dim, **tensors)


class TracedRotations:
    """Stand-in for the ``Rotations`` of an encoding during symbolic tracing: the ``node`` that yields them at run
    time, with what Python code reads at trace time: ``num_positions`` and ``depth`` (the encoding's; rotations shared
    by all layers have depth 1 at run time, which ``for_layer`` handles there)."""

    is_identity = False

    def __init__(self, node: Proxy, head_dim: int, depth: int, num_positions: int | Proxy) -> None:
        self.node, self.head_dim, self.depth, self.num_positions = node, head_dim, depth, num_positions

    def __len__(self) -> int:
        return self.depth

    def __getitem__(self, layer: int) -> TracedRotations:
        return TracedRotations(call_leaf(self.node.tracer, operator.getitem, self.node, layer), self.head_dim, 1,
                               self.num_positions)  # fmt: skip

    def for_layer(self, layer: int) -> TracedRotations:
        return TracedRotations(self.node.for_layer(layer), self.head_dim, 1, self.num_positions)

    def with_prefix(self, num_prefix_tokens: int) -> TracedRotations:
        node = self.node.with_prefix(num_prefix_tokens)
        return TracedRotations(node, self.head_dim, self.depth, self.num_positions + num_prefix_tokens)

    def transpose(self) -> TracedRotations:
        return TracedRotations(self.node.transpose(), self.head_dim, self.depth, self.num_positions)

    def apply(self, x: Tensor | Proxy) -> Proxy:
        return self.node.apply(x)


def traced_rotations(
    encoding: nn.Module, coords: Tensor | Grid | Proxy, num_prefix_tokens: int
) -> TracedRotations | None:
    """Under symbolic tracing: the encoding call as one node (``TracedRotations``), or None when it can run as is (a
    fixed encoding on concrete coordinates: its rotations become constants of the graph)."""
    tracer = find_tracer(encoding, coords)
    if tracer is None:
        return None
    node = call_leaf(tracer, encoding_rotations, encoding, coords_arg(coords), num_prefix_tokens)
    n = coords.num_positions if isinstance(coords, Grid) else coords.shape[-2]
    return TracedRotations(node, encoding.head_dim, encoding.depth, n + num_prefix_tokens)


def traced_add_to_tokens(encoding: nn.Module, x: Proxy, coords: Tensor | Grid | Proxy) -> Proxy:
    """``encoding.add_to_tokens(x, coords)`` on a ``Proxy`` ``x``, as one node."""
    return call_leaf(x.tracer, encoding_add_to_tokens, encoding, x, coords_arg(coords))


def rotations_node(rot: Rotations | TracedRotations, tracer: Any) -> Proxy:
    """The node yielding ``rot`` at run time (concrete ``Rotations``: rebuilt from their tensors, graph constants)."""
    if isinstance(rot, TracedRotations):
        return rot.node
    stored = {name: t for name in ("cos", "sin", "blocks", "basis") if (t := getattr(rot, name)) is not None}
    if not stored:
        stored = {"shape": rot._lead}
    return call_leaf(tracer, stored_rotations, rot.head_dim, stored)
