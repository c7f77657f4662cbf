"""Op-level speed benchmark: ``python -m bench.ops [--size tiny|small|real] [--device cpu|cuda] [--json PATH]``.

Two markdown tables; every row carries its time relative to a baseline timed in the same run:

- exponential: every ``skew_expm`` method against ``torch.linalg.matrix_exp`` in fp32, forward and
  forward+backward (time, and ``b x b`` products per rotation), on the generator stacks of real models
  (paper init: uniform ``[0, 2 pi)`` generators, coordinates in ``[0, 1]``), with orthogonality and relative
  error against the fp64 ``matrix_exp``; on 1D stacks also ``progression`` (``skew_expm_progression``: powers
  of one exponential per generator);
- application: ``Rotations.apply`` (pairs, blocks) against an eager RoPE (rotary-embedding-torch when
  installed) and one SDPA call of the same shape.

``--size`` defaults to ``tiny`` on CPU and ``real`` on CUDA; rows are printed as they are measured. On CUDA the
application runs in bf16 (autocast), times come from CUDA events, and peak memory from
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import RowPrinter, add_ratios, autocast, bench_parser, default_size, describe, time_ms, write_json
from liere.coords import grid_coords
from liere.expm import orthogonality_error, skew_expm, skew_expm_progression
from liere.lie import LieRE
from liere.rotations import Rotations

SIZES = ("tiny", "small", "real")
HEAD_DIM = 64
BLOCKS = (2, 4, 8, 64)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- exponential
@dataclass(frozen=True)
class Stack:
    """Generator stack of a model: ``depth x heads x positions x (head_dim / b)`` skew ``b x b`` matrices."""

    name: str
    heads: int
    grid: tuple[int, ...]
    depth: int = 1


def stacks(size: str) -> list[Stack]:
    side, length, depth = {"tiny": (3, 64, 2), "small": (7, 256, 12), "real": (14, 1024, 12)}[size]
    return [
        Stack("ViT-S", 6, (side, side)),
        Stack(f"ViT-S x{depth} layers", 6, (side, side), depth=depth),
        Stack("ViT-B", 12, (side, side)),
        Stack("char-LM", 8, (length,)),
    ]


def generators(stack: Stack, b: int) -> tuple[Tensor, Tensor]:
    """Paper-init generator blocks ``(depth, heads, axes, nb, b, b)`` and the coordinates ``(n, axes)`` in [0, 1]."""
    rot_dim = HEAD_DIM // b * b  # b=3: 21 blocks, one feature passes through
    pe = LieRE(HEAD_DIM, len(stack.grid), stack.heads, stack.depth, b, rot_dim=rot_dim, init="uniform", seed=0)
    coords = grid_coords(*stack.grid, spacing=[1 / max(n - 1, 1) for n in stack.grid])
    return pe.generator_blocks().detach(), coords


def algebra(gens: Tensor, coords: Tensor) -> Tensor:
    """``sum_a p_a A_a`` for every layer, head, position and block, flattened to ``(matrices, b, b)``."""
    return torch.einsum("na,lhaiuv->lhniuv", coords.to(gens), gens).flatten(0, -3)


def exp_methods(stack: Stack, b: int) -> list[str]:
    """The baseline, every ``skew_expm`` method for ``b``, and powers of one exponential on 1D stacks."""
    return ["matrix_exp", "exact", *(["closed"] if b <= 4 else []), "taylor_cans", *(["progression"] * is_1d(stack))]


def is_1d(stack: Stack) -> bool:
    return len(stack.grid) == 1


def auto_method(stack: Stack, b: int) -> str:
    """What LieRE runs: powers on evenly spaced 1D positions (b >= 3), else ``skew_expm``'s ``"auto"``."""
    return "progression" if is_1d(stack) and b >= 3 else "closed" if b <= 4 else "taylor_cans"


def exp_function(
    gens: Tensor, coords: Tensor, method: str, device: torch.device
) -> tuple[Callable[[Tensor], Tensor], Tensor, Callable[[Tensor], Tensor]]:
    """``(fn, x, to_algebra)`` for ``generators``' output: ``fn(x)`` is the rotations ``(matrices, b, b)`` by
    ``method``, in ``algebra``'s order, and ``exp(to_algebra(x))`` what they should be.

    ``x`` is the algebra stack, or for ``"progression"`` the generators (the rotations are their powers).
    """
    if method != "progression":
        fn = torch.linalg.matrix_exp if method == "matrix_exp" else lambda x: skew_expm(x, method)
        return fn, algebra(gens, coords).to(device), lambda x: x
    n, step = coords.shape[0], float(coords[1, 0] - coords[0, 0])

    def powers(G: Tensor) -> Tensor:  # (depth, heads, nb, n, b, b) -> (depth, heads, n, nb, b, b)
        return skew_expm_progression(G, 0.0, step, n).movedim(-3, -4).flatten(0, -3)

    return powers, gens[:, :, 0].to(device), lambda G: algebra(G.unsqueeze(2), coords)


class ProductCounter(TorchDispatchMode):
    """Counts the flops of every matrix product dispatched (``mm``, ``bmm``, ``baddbmm``, ``addmm``; forward and
    backward), in units of one ``b x b`` product (``2 b^3`` flops)."""

    OPS = ("aten.mm.", "aten.bmm.", "aten.baddbmm.", "aten.addmm.")

    def __init__(self, b: int) -> None:
        super().__init__()
        self.b, self.products = b, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if str(func).startswith(self.OPS):
            a, c = args[-2], args[-1]  # (batch,) m x k  @  (batch,) k x n
            self.products += a.numel() * c.shape[-1] / self.b**3
        return func(*args, **(kwargs or {}))


def products_per_rotation(fn: Callable[[Tensor], Tensor], x: Tensor, backward: bool) -> float:
    """``b x b`` products per output rotation of ``fn(x)`` (forward, or forward + backward), counted as dispatched."""
    x = x.detach().requires_grad_(backward)
    with ProductCounter(x.shape[-1]) as counter:
        R = fn(x)
        if backward:
            R.backward(torch.randn_like(R))
    return counter.products / R.shape[0]


# torch.linalg.matrix_exp (Bader-Blanes-Casas) picks its degree by the 1-norm: Taylor degrees 1, 2, 4, 8, 12
# below these fp32 bounds (0 to 4 products), else degree 18 (5 products) and ceil(log2(norm / 3.01)) squarings
MATRIX_EXP_THETAS = (
    1.192092800768788e-07,
    5.978858893805233e-04,
    5.116619363445086e-02,
    5.800524627688768e-01,
    1.461661507209034,
)


def matrix_exp_products(A: Tensor) -> Tensor:
    """Products (in ``b x b`` units) ``torch.linalg.matrix_exp`` spends on each matrix of ``A`` (its kernels run
    below the dispatcher, so they are counted from its algorithm). Backward: ``matrix_exp`` of the ``2b x 2b``
    block matrix ``[[A^T, G], [0, A^T]]``, 8 units per product."""
    norm = torch.linalg.matrix_norm(A.double(), ord=1)
    small = torch.bucketize(norm, torch.tensor(MATRIX_EXP_THETAS, dtype=torch.float64))  # 0..5
    squarings = torch.ceil(torch.log2(norm / 3.010066362817634)).clamp(min=0)
    return torch.where(small < 5, small.double(), 5 + squarings)


def matrix_exp_fwd_bwd_products(A: Tensor) -> float:
    """Mean forward + backward products per matrix of ``torch.linalg.matrix_exp`` with an N(0, 1) cotangent."""
    G = torch.randn_like(A.double())
    meta = torch.cat([torch.cat([A.double().mT, G], -1), torch.cat([torch.zeros_like(G), A.double().mT], -1)], -2)
    return float((matrix_exp_products(A) + 8 * matrix_exp_products(meta)).mean())


def fwd_bwd(fn: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], None]:
    """A closure running ``fn(x)`` forward and backward against a fixed random cotangent."""
    x = x.detach().requires_grad_()
    cotangent = torch.randn_like(fn(x).float()).to(x.dtype)

    def step() -> None:
        x.grad = None
        fn(x).backward(cotangent)

    return step


def bench_exponential(
    size: str,
    device: torch.device,
    blocks: Sequence[int],
    repeats: int,
    emit: Callable[[list[dict]], None],
    dtypes: Sequence[str] = ("fp32",),
) -> list[dict]:
    """One row per (stack, b, input dtype, method); baseline: ``torch.linalg.matrix_exp`` fp32. Each (stack, b)
    group goes to ``emit`` as soon as it is measured."""
    rows = []
    for stack in stacks(size):
        for b in blocks:
            gens, coords = generators(stack, b)
            group, fns = [], {}
            for dname in dtypes:
                dtype = DTYPES[dname]
                for method in exp_methods(stack, b):
                    if method == "matrix_exp" and dtype != torch.float32:
                        continue  # the baseline; natively in bf16 it returns NaN or is unsupported
                    fn, x, to_algebra = exp_function(gens, coords, method, device)
                    x = x.to(dtype)
                    R = fn(x)
                    ref = torch.linalg.matrix_exp(to_algebra(x.double()))  # the exact result for this input
                    rel = torch.linalg.matrix_norm(R.double() - ref).amax() / math.sqrt(b)
                    if method in ("matrix_exp", "exact"):
                        products = float(matrix_exp_products(x).mean()), matrix_exp_fwd_bwd_products(x)
                    else:
                        products = tuple(products_per_rotation(fn, x, backward) for backward in (False, True))
                    key = (dname, method)
                    fns[("fwd", *key)] = lambda fn=fn, x=x: fn(x)
                    fns[("fwdbwd", *key)] = fwd_bwd(fn, x)
                    group.append(
                        dict(
                            stack=stack.name,
                            matrices=R.shape[0],
                            block=b,
                            dtype=dname,
                            method=method,
                            auto=method == auto_method(stack, b),
                            fwd_products=products[0],
                            fwdbwd_products=products[1],
                            orth_error=float(orthogonality_error(R)),
                            rel_error=float(rel),
                        )
                    )
            times = time_ms(fns, device, repeats)
            for row in group:
                for t in ("fwd", "fwdbwd"):
                    row[f"{t}_ms"] = times[(t, row["dtype"], row["method"])]
            add_ratios(group, lambda r: None, lambda r: r["method"] == "matrix_exp")
            emit(group)
            rows += group
    return rows


EXP_COLUMNS = [
    ("stack", "stack"),
    ("matrices", "matrices"),
    ("block", "b"),
    ("dtype", "input"),
    ("method", "method"),
    ("auto", "auto"),
    ("fwd_products", "products fwd"),
    ("fwdbwd_products", "products fwd+bwd"),
    ("fwd_ms", "fwd ms"),
    ("fwd_ratio", "fwd / matrix_exp"),
    ("fwdbwd_ms", "fwd+bwd ms"),
    ("fwdbwd_ratio", "fwd+bwd / matrix_exp"),
    ("orth_error", "orth err"),
    ("rel_error", "rel err"),
]


# ----------------------------------------------------------------------------- application
@dataclass(frozen=True)
class Shape:
    """Queries ``(batch, heads, n, HEAD_DIM)`` of a model's attention layer."""

    name: str
    batch: int
    heads: int
    n: int
    causal: bool = False


def shapes(size: str) -> list[Shape]:
    vit = {"tiny": (8, 10), "small": (64, 50), "real": (256, 197)}[size]
    lm = {"tiny": (4, 64), "small": (8, 256), "real": (32, 1024)}[size]
    return [Shape("ViT-S", vit[0], 6, vit[1]), Shape("char-LM", lm[0], 8, lm[1], causal=True)]


def eager_rope() -> tuple[str, Callable[[Tensor], Tensor]]:
    """rotary-embedding-torch's ``rotate_queries_or_keys`` if installed, else the same math inline."""
    try:
        from rotary_embedding_torch import RotaryEmbedding
    except ImportError:
        freqs = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)

        def rope(x: Tensor) -> Tensor:
            angles = torch.arange(x.shape[-2], device=x.device).float()[:, None] * freqs.to(x.device)
            angles = angles.repeat_interleave(2, dim=-1)
            x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
            rotated = torch.stack((-x1, x0), dim=-1).flatten(-2)
            return (x * angles.cos() + rotated * angles.sin()).to(x.dtype)

        return "rope (eager inline)", rope
    return "rope (rotary-embedding-torch)", RotaryEmbedding(dim=HEAD_DIM).rotate_queries_or_keys


def random_rotations(shape: Shape, block: int, device: torch.device) -> Rotations:
    """Per-head rotations (shared by the batch) for ``shape``: pairs for ``block == 2``, else blocks."""
    gen = torch.Generator().manual_seed(block)
    if block == 2:
        angles = torch.rand(1, 1, shape.heads, shape.n, HEAD_DIM // 2, generator=gen) * 2 * math.pi
        rot = Rotations(HEAD_DIM, cos=angles.cos(), sin=angles.sin())
    else:
        M = torch.randn(1, 1, shape.heads, shape.n, HEAD_DIM // block, block, block, generator=gen)
        rot = Rotations(HEAD_DIM, blocks=skew_expm(M - M.mT))
    return rot.to(device)


def application_fns(shape: Shape, device: torch.device, blocks: Sequence[int]) -> dict[str, Callable[..., Tensor]]:
    """Name -> function of ``(q, k, v, *rotation tensors)`` for every applied variant (baseline first)."""
    name, rope = eager_rope()
    fns: dict[str, Callable[..., Tensor]] = {name: lambda q, k, v: rope(q)}
    for block in blocks:
        rot = random_rotations(shape, block, device)
        label = "pairs" if block == 2 else f"blocks b={block}"
        for t in (rot.cos, rot.sin, rot.blocks):
            if t is not None:
                t.requires_grad_()  # learned rotations: fwd+bwd includes their gradient
        fns[f"Rotations.apply {label}"] = lambda q, k, v, rot=rot: rot.apply(q)
    fns["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal)
    return fns


def attention_steps(
    fn: Callable[..., Tensor], qkv: list[Tensor], device: torch.device
) -> tuple[Callable[[], object], Callable[[], object]]:
    """Closures running ``fn(q, k, v)`` forward only, and forward+backward (gradients for q, k, v, rotations)."""

    def forward() -> Tensor:
        with autocast(device), torch.no_grad():
            return fn(*qkv)

    with autocast(device), torch.no_grad():
        # a dense random cotangent: `.sum().backward()` would feed a stride-0 gradient, which sends CPU
        # bmm backward down a slow per-matrix path that real training never takes
        cotangent = torch.randn_like(fn(*qkv))

    def train() -> None:
        q, k, v = (t.detach().requires_grad_() for t in qkv)
        with autocast(device):
            out = fn(q, k, v)
        out.backward(cotangent)

    return forward, train


def bench_application(
    size: str, device: torch.device, blocks: Sequence[int], repeats: int, emit: Callable[[list[dict]], None]
) -> list[dict]:
    """One row per (shape, variant); baseline: the eager RoPE on the same queries. Each shape's rows go to
    ``emit`` as soon as they are measured."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for shape in shapes(size):
        gen = torch.Generator().manual_seed(0)
        qkv = [torch.randn(shape.batch, shape.heads, shape.n, HEAD_DIM, generator=gen).to(device, dtype) for _ in "qkv"]
        variants = application_fns(shape, device, blocks)
        fns = {}
        for variant, fn in variants.items():
            fns[("fwd", variant)], fns[("fwdbwd", variant)] = attention_steps(fn, qkv, device)
        times = time_ms(fns, device, repeats)
        group = []
        for variant in variants:
            group.append(
                dict(
                    shape=f"{shape.name} {shape.batch}x{shape.heads}x{shape.n}x{HEAD_DIM}",
                    variant=variant,
                    dtype="bf16 autocast" if device.type == "cuda" else "fp32",
                    fwd_ms=times[("fwd", variant)],
                    fwdbwd_ms=times[("fwdbwd", variant)],
                )
            )
        add_ratios(group, lambda r: None, lambda r: r["variant"].startswith("rope"))
        emit(group)
        rows += group
    return rows


APPLY_COLUMNS = [
    ("shape", "q shape"),
    ("variant", "variant"),
    ("dtype", "dtype"),
    ("fwd_ms", "fwd ms"),
    ("fwd_ratio", "fwd / RoPE"),
    ("fwdbwd_ms", "fwd+bwd ms"),
    ("fwdbwd_ratio", "fwd+bwd / RoPE"),
]


# ----------------------------------------------------------------------------- entry point
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser("python -m bench.ops", __doc__.split("\n")[0], SIZES, "repeats per row")
    parser.set_defaults(repeats=3)  # the tiny default run stays well under a minute on 2 cores
    parser.add_argument("--blocks", type=int, nargs="+", default=list(BLOCKS), help="exponential block sizes")
    parser.add_argument(
        "--dtypes", nargs="+", choices=list(DTYPES), default=["fp32"], help="exponential input dtypes (bf16: upcast)"
    )
    parser.add_argument(
        "--apply-blocks", type=int, nargs="+", default=[2, 8, 64], help="application block sizes (2 = pairs)"
    )
    tables = ["exponential", "application"]
    parser.add_argument("--tables", nargs="+", choices=tables, default=tables, help="which tables to run")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print markdown tables, return (and optionally write) the results."""
    args = parse_args(argv)
    device = torch.device(args.device)
    size = args.size or default_size(device)
    results: dict = dict(device=describe(device), size=size)
    print(f"# liere op benchmark: {results['device']}, size {size}\n", flush=True)
    if "exponential" in args.tables:
        print("## exponential (baseline: torch.linalg.matrix_exp fp32; products: b x b matrix products per rotation)\n")
        results["exponential"] = bench_exponential(
            size, device, args.blocks, args.repeats, RowPrinter(EXP_COLUMNS), args.dtypes
        )
        print()
    if "application" in args.tables:
        print("## application (baseline: eager RoPE)\n")
        results["application"] = bench_application(
            size, device, args.apply_blocks, args.repeats, RowPrinter(APPLY_COLUMNS)
        )
        print()
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
