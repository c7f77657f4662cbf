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

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.fx import Proxy
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from liere.coords import Grid

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


def call_leaf(tracer: Any, fn: Callable[..., Any], *args: object, **kwargs: object) -> Proxy:
    """Record ``fn(*args, **kwargs)`` as one ``call_function`` node (modules become references to submodules)."""
    return tracer.create_proxy("call_function", fn, args, kwargs)


def encoding_rotations(encoding: nn.Module, coords: CoordsArg, num_prefix_tokens: int) -> Any:
    """Run time of a traced encoding call: ``encoding(coords, num_prefix_tokens)``."""
    return encoding(as_coords(coords), num_prefix_tokens)


def encoding_add_to_tokens(encoding: nn.Module, x: Tensor, coords: CoordsArg) -> Tensor:
    """Run time of a traced ``encoding.add_to_tokens(x, coords)``."""
    return encoding.add_to_tokens(x, as_coords(coords))


class TracedRotations:
    """Stand-in for an encoding's ``Rotations`` during symbolic tracing: how to record the node that yields them at
    run time, and what Python code reads at trace time: ``num_positions`` and ``depth`` (the encoding's; rotations
    shared by all layers have depth 1 at run time, which ``for_layer`` handles there).

    Nodes are recorded when first needed (``apply``, ``rotary_attention``), with the tracer of the ``Proxy`` they act
    on, and once: every layer's rotations come from the one encoding node.
    """

    is_identity = False

    def __init__(self, record: Callable[[Any], Proxy], head_dim: int, depth: int, num_positions: int | Proxy) -> None:
        self.record, self.head_dim, self.depth, self.num_positions = record, head_dim, depth, num_positions
        self._node: Proxy | None = None

    def node(self, tracer: Any) -> Proxy:
        """The node yielding these rotations (recorded on the first call)."""
        if self._node is None:
            self._node = self.record(tracer)
        return self._node

    def _then(self, method: str, *args: object, depth: int | None = None, extra: int = 0) -> TracedRotations:
        """These rotations' ``method(*args)`` at run time."""

        def record(tracer: Any) -> Proxy:
            return getattr(self.node(tracer), method)(*args)

        return TracedRotations(record, self.head_dim, depth or self.depth, self.num_positions + extra)

    def __len__(self) -> int:
        return self.depth

    def __getitem__(self, layer: int) -> TracedRotations:
        return self._then("__getitem__", layer, depth=1)

    def for_layer(self, layer: int) -> TracedRotations:
        return self._then("for_layer", layer, depth=1)

    def with_prefix(self, num_prefix_tokens: int) -> TracedRotations:
        return self._then("with_prefix", num_prefix_tokens, extra=num_prefix_tokens)

    def transpose(self) -> TracedRotations:
        return self._then("transpose")

    def apply(self, x: Proxy) -> Proxy:
        return self.node(x.tracer).apply(x)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"Rotations.{name} is not available while torch.fx traces; a traced graph can use rot[layer], "
            "rot.for_layer(layer), rot.transpose(), rot.with_prefix(k), rot.apply(x) and rotary_attention"
        )


def traced_rotations(encoding: nn.Module, coords: Tensor | Grid | Proxy, num_prefix_tokens: int) -> TracedRotations:
    """Under symbolic tracing: the encoding call, to be recorded as one node (``TracedRotations``)."""
    arg = coords_arg(coords)
    n = coords.num_positions if isinstance(coords, Grid) else coords.shape[-2]

    def record(tracer: Any) -> Proxy:
        return call_leaf(tracer, encoding_rotations, encoding, arg, num_prefix_tokens)

    return TracedRotations(record, encoding.head_dim, encoding.depth, n + num_prefix_tokens)


def traced_add_to_tokens(encoding: nn.Module, x: Proxy, coords: Tensor | Grid | Proxy) -> Proxy:
    """``encoding.add_to_tokens(x, coords)`` on a ``Proxy`` ``x``, as one node."""
    return call_leaf(x.tracer, encoding_add_to_tokens, encoding, x, coords_arg(coords))
