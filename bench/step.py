"""Model-level speed benchmark: ``python -m bench.step [--size tiny|real] [--device cpu|cuda] [--json PATH]``.

Times one training step (forward, backward, AdamW step; bf16 autocast on CUDA, fp32 on CPU) of ViT-S/16 at
224 px, the paper's CIFAR setting (ViT-B, 32 px, patch 4) and the char-LM (6 layers, width 512, 8 heads,
context 1024) for every encoding, plus ``reference``: what the official LieRE code does (fp32
``torch.linalg.matrix_exp`` of dense head_dim x head_dim generators every forward, rotations expanded to
the batch and applied with ``bmm``). Each row shows its time and memory relative to RoPE (axial RoPE for
images) from the same run. Peak memory is ``torch.cuda.max_memory_allocated`` (CUDA only); "saved MiB", the
distinct tensor storages autograd keeps for the backward after one forward, is measured on every device and
is what a LieRE step adds to peak memory (rotations and exponential intermediates). ``--size tiny`` (the CPU
default) shrinks every model; ``--compile`` adds compiled rows; ``--bf16`` uses bf16 autocast on CPU too (it
is always on on CUDA); ``--memory-only`` skips the timing (real sizes on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.common import autocast, bench_parser, default_size, describe, markdown_table, time_ms, write_json
from liere.encoding import PositionEncoding, check_positive_int
from liere.linalg import num_skew_params, skew_from_params
from liere.rotations import Rotations
from models import CharLM, ViT

COLLECTION = ("string-cayley", "string-circulant", "comrope-ap", "comrope-ld")
ENCODINGS_2D = ("none", "axial-rope", "rope-mixed", "liere8", "liere64", "reference", "visionllama", *COLLECTION)
ENCODINGS_1D = ("none", "rope", "rope-mixed", "liere8", "liere64", "reference", "rope-basis", *COLLECTION)


class ReferenceRotations(Rotations):
    """Dense rotations applied the way the official LieRE code does: copied per sample, one ``bmm``."""

    def apply(self, x: Tensor) -> Tensor:
        self.check_input(x)
        batch, heads, n, d = x.shape
        mats = self.blocks[0, :, :, :, 0].expand(batch, heads, n, d, d).reshape(-1, d, d)
        return torch.bmm(mats, x.reshape(-1, d, 1)).reshape(x.shape)


class ReferenceLieRE(PositionEncoding):
    """The official LieRE recipe: per-layer, per-head dense generators, uniform ``[0, 2 pi)`` init, fp32
    ``torch.linalg.matrix_exp`` every forward."""

    def __init__(self, head_dim: int, num_axes: int, num_heads: int, depth: int) -> None:
        super().__init__(head_dim, num_axes, depth)
        shape = (depth, num_heads, num_axes, num_skew_params(head_dim))
        self.generators = nn.Parameter(torch.rand(shape) * 2 * torch.pi)

    def rotations(self, coords: Tensor) -> Rotations:
        gens = skew_from_params(self.generators.to(coords), self.head_dim)
        algebra = torch.einsum("sna,lhauv->lshnuv", coords, gens)
        return ReferenceRotations(self.head_dim, blocks=torch.linalg.matrix_exp(algebra.contiguous())[..., None, :, :])


@dataclass(frozen=True)
class Setting:
    """A model and its batch: ``build(encoding)`` gives the model, ``batch`` the inputs and targets."""

    name: str
    kind: str  # "vit" or "lm"
    config: dict = field(default_factory=dict)
    batch: int = 1

    @property
    def encodings(self) -> tuple[str, ...]:
        """The default encodings of this kind of model; the second is the RoPE baseline of every ratio."""
        return ENCODINGS_2D if self.kind == "vit" else ENCODINGS_1D


def settings(size: str) -> list[Setting]:
    if size == "real":
        return [
            Setting("ViT-S/16 224px", "vit", dict(image=224, patch=16, classes=1000, dim=384, depth=12, heads=6), 256),
            Setting(
                "ViT-B CIFAR 32px/4", "vit", dict(image=32, patch=4, classes=100, dim=768, depth=12, heads=12), 256
            ),
            Setting("char-LM 6x512 ctx1024", "lm", dict(context=1024, dim=512, depth=6, heads=8), 32),
        ]
    small = dict(dim=128, depth=2, heads=2)  # head_dim 64, as in the real models
    return [
        Setting("ViT 32px/8 (tiny)", "vit", dict(image=32, patch=8, classes=10, **small), 8),
        Setting("ViT CIFAR 32px/4 (tiny)", "vit", dict(image=32, patch=4, classes=10, **small), 8),
        Setting("char-LM ctx128 (tiny)", "lm", dict(context=128, **small), 4),
    ]


def build_model(setting: Setting, encoding: str) -> nn.Module:
    """The setting's model with ``encoding`` (a factory spec, or ``"reference"``)."""
    cfg = setting.config
    dims = dict(dim=cfg["dim"], depth=cfg["depth"], heads=cfg["heads"])
    axes = 2 if setting.kind == "vit" else 1
    pe: PositionEncoding | str = encoding
    if encoding == "reference":
        pe = ReferenceLieRE(cfg["dim"] // cfg["heads"], axes, cfg["heads"], cfg["depth"])
    if setting.kind == "vit":
        return ViT((3, cfg["image"], cfg["image"]), cfg["classes"], cfg["patch"], encoding=pe, **dims)
    return CharLM(256, cfg["context"], encoding=pe, **dims)


def inputs(setting: Setting, device: torch.device) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    if setting.kind == "vit":
        image, classes = setting.config["image"], setting.config["classes"]
        x = torch.randn(setting.batch, 3, image, image, generator=gen)
        y = torch.randint(0, classes, (setting.batch,), generator=gen)
    else:
        context = setting.config["context"]
        x = torch.randint(0, 256, (setting.batch, context), generator=gen)
        y = torch.randint(0, 256, (setting.batch, context), generator=gen)
    return x.to(device), y.to(device)


def train_step(
    model: nn.Module, x: Tensor, y: Tensor, precision: AbstractContextManager, compile: bool
) -> Callable[[], None]:
    """A closure doing one forward, backward and AdamW step (forward under the ``precision`` context)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compile else model

    def step() -> None:
        with precision:
            logits = forward(x)
        loss = F.cross_entropy(logits.float().flatten(0, -2), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def peak_memory_mb(step: Callable[[], None], device: torch.device) -> float | None:
    """Peak allocated memory of one (already warm) step, in MiB; ``None`` on CPU (not measured)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def saved_mib(model: Callable[[Tensor], Tensor], x: Tensor, precision: AbstractContextManager) -> float:
    """MiB of the distinct tensor storages autograd saves for the backward during one forward of ``model``.

    Device-independent: activations, rotations and exponential intermediates held for the backward (and the
    weights the backward reads), counted once per storage however many ops save it.
    """
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()  # the graph keeps it alive: no address is reused
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision:
        out = model(x)
    del out
    return sum(storages.values()) / 2**20


def step_variants(args: argparse.Namespace, device: torch.device) -> tuple[bool, ...]:
    """The ``compiled`` flags of the training steps to build: none for ``--memory-only`` on CPU (saved memory
    needs no step), eager only for ``--memory-only`` on CUDA (its peak memory), eager and compiled with
    ``--compile``."""
    if args.memory_only:
        return (False,) if device.type == "cuda" else ()
    return (False, True) if args.compile else (False,)


def bench_setting(
    setting: Setting, encodings: Sequence[str], device: torch.device, args: argparse.Namespace
) -> list[dict]:
    """One row per encoding (and per compiled flag); steps timed round-robin, memory one model at a time.

    ``args``: the command line's ``compile``, ``repeats``, ``bf16`` and ``memory_only``.
    """
    x, y = inputs(setting, device)
    steps, peak, saved = {}, {}, {}
    for encoding in encodings:
        torch.manual_seed(0)
        model = build_model(setting, encoding).to(device)
        saved[encoding] = saved_mib(model, x, autocast(device, args.bf16))
        for compiled in step_variants(args, device):
            step = train_step(model, x, y, autocast(device, args.bf16), compiled)
            step()  # warm-up (and compilation)
            peak[(encoding, compiled)] = peak_memory_mb(step, device)
            steps[(encoding, compiled)] = step
    keys = [(e, False) for e in encodings] if args.memory_only else list(steps)
    times = {} if args.memory_only else time_ms(steps, device, args.repeats)
    baseline = setting.encodings[1]
    rows = []
    for encoding, compiled in keys:
        ms, base_ms = times.get((encoding, compiled)), times.get((baseline, compiled))
        mem, base_mem = peak.get((encoding, compiled)), peak.get((baseline, compiled))
        rows.append(
            dict(
                model=f"{setting.name} batch {setting.batch}",
                encoding=encoding,
                compiled=compiled,
                step_ms=ms,
                step_ratio=None if ms is None else ms / base_ms,
                peak_mib=mem,
                mem_ratio=None if mem is None else mem / base_mem,
                saved_mib=saved[encoding],
                saved_ratio=saved[encoding] / saved[baseline],
            )
        )
    return rows


COLUMNS = [
    ("model", "model"),
    ("encoding", "encoding"),
    ("compiled", "compiled"),
    ("step_ms", "step ms"),
    ("step_ratio", "step / RoPE"),
    ("peak_mib", "peak MiB"),
    ("mem_ratio", "memory / RoPE"),
    ("saved_mib", "saved MiB"),
    ("saved_ratio", "saved / RoPE"),
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser("python -m bench.step", __doc__.split("\n")[0], ("tiny", "real"), "steps per model")
    parser.add_argument("--models", nargs="+", help="substrings of model names to keep (default: all)")
    parser.add_argument(
        "--encodings",
        nargs="+",
        help="factory specs (or 'reference') to run; default: the RoPE family, LieRE, the official-code "
        "reference and the other collection encodings; the RoPE baseline is always added",
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (always on on CUDA)")
    parser.add_argument("--batch", type=int, help="override every model's batch size (saved memory is linear in it)")
    parser.add_argument("--memory-only", action="store_true", help="measure saved memory only, no timing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print a markdown table, return (and optionally write) the results."""
    args = parse_args(argv)
    device = torch.device(args.device)
    size = args.size or default_size(device)
    results: dict = dict(device=describe(device), size=size, rows=[])
    print(f"# liere model benchmark: {results['device']}, size {size}\n")
    for setting in settings(size):
        if args.models and not any(m in setting.name for m in args.models):
            continue
        if args.batch is not None:
            setting = dataclasses.replace(setting, batch=check_positive_int(args.batch, "--batch"))
        names = setting.encodings
        encodings = list(names) if args.encodings is None else [names[1], *(e for e in args.encodings if e != names[1])]
        results["rows"] += bench_setting(setting, encodings, device, args)
    print(markdown_table(results["rows"], COLUMNS) + "\n")
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
