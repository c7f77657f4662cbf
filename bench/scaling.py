"""Rotation cost as the token grid grows: ``python -m bench.scaling [--size tiny|real] [--json PATH]``.

For 1D (256 .. 8192 tokens), 2D (8x8 .. 32x32) and 3D (4x8x8 .. 8x16x16) grids, one layer of ViT-S-like
attention (6 heads of 64, batch 8): the time of the encoding (``pe(coords)`` forward + backward against a random
cotangent: for LieRE the exponentials, for RoPE the angles) and of its application (``rot.apply`` to q and k,
forward + backward to q, k and the rotations), for RoPE (axial RoPE in 2D/3D), LieRE-8 and LieRE-64 with their
defaults (1D LieRE: powers of one exponential). Every (encoding, part) of a grid is timed round-robin in one run;
each row gives its total's ratio to RoPE's and which part dominates. Neither part depends on the model width;
the application grows with the batch, the exponential does not.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

import liere
from bench.common import bench_parser, default_size, describe, markdown_table, time_ms, write_json
from liere import Rotations, encoding_info, grid_coords

HEADS, HEAD_DIM, BATCH = 6, 64, 8


def grids(size: str) -> list[tuple[int, ...]]:
    if size == "tiny":
        return [(64,), (4, 4), (2, 4, 4)]
    return [
        *((n,) for n in (256, 1024, 4096, 8192)),
        *((n, n) for n in (8, 16, 24, 32)),
        (4, 8, 8),
        (8, 8, 8),
        (8, 16, 16),
    ]


def stored(rot: Rotations) -> list[Tensor]:
    """The tensors a ``Rotations`` holds (blocks, or cos and sin)."""
    return [rot.blocks] if rot.blocks is not None else [rot.cos, rot.sin]


def as_leaf(rot: Rotations) -> Rotations:
    """The same rotations as detached leaves that require grad (the application's own backward)."""
    tensors = [t.detach().requires_grad_() for t in stored(rot)]
    if rot.blocks is not None:
        return Rotations(rot.head_dim, blocks=tensors[0])
    return Rotations(rot.head_dim, cos=tensors[0], sin=tensors[1])


def parts(spec: str, shape: tuple[int, ...], device: torch.device) -> dict[str, Callable[[], object]]:
    """``{"encoding": ..., "application": ...}`` closures for ``spec`` on a ``shape`` grid."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    pe = liere.build(spec, head_dim=HEAD_DIM, num_axes=len(shape), num_heads=HEADS, depth=1).to(device)
    coords = grid_coords(*shape, device=device)
    params = [p for p in pe.parameters() if p.requires_grad]
    rot = pe(coords)[0]
    cots = [torch.randn(t.shape, generator=gen).to(device) for t in stored(rot)]
    q, k = (torch.randn(BATCH, HEADS, coords.shape[0], HEAD_DIM, generator=gen).to(device) for _ in range(2))
    q.requires_grad_(), k.requires_grad_()
    leaf = as_leaf(rot)
    out_cot = torch.randn(2, *q.shape, generator=gen).to(device)

    def encoding() -> None:
        tensors = stored(pe(coords)[0])
        if params:
            torch.autograd.grad(tensors, params, cots)

    def application() -> None:
        out = torch.stack([leaf.apply(q), leaf.apply(k)])
        torch.autograd.grad(out, [q, k, *stored(leaf)], out_cot)

    return dict(encoding=encoding, application=application)


def bench_grid(shape: tuple[int, ...], device: torch.device, repeats: int) -> list[dict]:
    baseline = "rope" if len(shape) == 1 else "axial-rope"
    specs = (baseline, *encoding_info("liere<block_size>").compare)
    fns = {(spec, part): fn for spec in specs for part, fn in parts(spec, shape, device).items()}
    times = time_ms(fns, device, repeats)
    total = {spec: times[spec, "encoding"] + times[spec, "application"] for spec in specs}
    rows = []
    for spec in specs:
        enc, app = times[spec, "encoding"], times[spec, "application"]
        rows.append(
            dict(
                grid="x".join(map(str, shape)),
                tokens=int(torch.tensor(shape).prod()),
                encoding=spec,
                encoding_ms=enc,
                application_ms=app,
                total_ms=total[spec],
                ratio=total[spec] / total[baseline],
                dominant="encoding" if enc > app else "application",
            )
        )
    return rows


COLUMNS = [
    ("grid", "grid"),
    ("tokens", "tokens"),
    ("encoding", "encoding"),
    ("encoding_ms", "encoding fwd+bwd ms"),
    ("application_ms", "application fwd+bwd ms"),
    ("total_ms", "total ms"),
    ("ratio", "total / RoPE"),
    ("dominant", "larger part"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("python -m bench.scaling", __doc__.split("\n")[0], ("tiny", "real"), "calls per part")
    parser.add_argument("--grids", nargs="+", help="grids to keep, e.g. 16x16 8x16x16 (default: all of the size)")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print one table per grid as it is measured, return (and optionally write) the rows."""
    args = parse_args(argv)
    device = torch.device(args.device)
    size = args.size or default_size(device)
    results: dict = dict(device=describe(device), size=size, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, rows=[])
    print(f"# liere rotation scaling: {results['device']}, size {size}\n", flush=True)
    for shape in grids(size):
        if args.grids and "x".join(map(str, shape)) not in args.grids:
            continue
        rows = bench_grid(shape, device, args.repeats)
        print(markdown_table(rows, COLUMNS) + "\n", flush=True)
        results["rows"] += rows
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
