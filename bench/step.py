"""Model-level speed benchmark: ``python -m bench.step [--size tiny|small|real] [--device cpu|cuda] [--json PATH]``.

Times one training step (forward, backward, AdamW step; bf16 autocast on CUDA, fp32 on CPU) of ViT-S/16 at
224 px, the paper's CIFAR setting (ViT-B, 32 px, patch 4) and the char-LM (6 layers, width 512, 8 heads,
context 1024) for every encoding, plus ``reference``: what the official LieRE code does (fp32
``torch.linalg.matrix_exp`` of dense head_dim x head_dim generators every forward, rotations expanded to
the batch and applied with ``bmm``). Each row shows its time and memory relative to RoPE (axial RoPE for
images) from the same run. Peak memory is ``torch.cuda.max_memory_allocated`` (CUDA only); "saved MiB", the
distinct tensor storages autograd keeps for the backward after one forward, is measured on every device and
is what a LieRE step adds to saved memory; ``--peak`` adds each encoding's first-step peak rise, measured in a
fresh process (CPU: the kernel's peak-RSS counter, reset after the model is built), which also counts the
transients (the exponential's intermediates while they are computed). ``--size tiny`` (the CPU default)
shrinks every model, ``small`` is a 6-layer ViT of width 192 on a 2D and a 3D grid; ``--compile`` adds compiled
rows; ``--bf16`` uses bf16 autocast on CPU too (it is always on on CUDA); ``--memory-only`` skips the timing;
``--fit B1 B2 [B3]`` fits each encoding's step time ``t(B) = a + b B`` and predicts the ratios at the real batch.
Rows are printed as soon as each model's are measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.common import (
    autocast,
    bench_parser,
    default_size,
    describe,
    markdown_table,
    registry_examples,
    time_ms,
    write_json,
)
from liere.encoding import PositionEncoding, check_positive_int
from liere.factory import default_comparison
from liere.linalg import num_skew_params, skew_from_params
from liere.rotations import Rotations
from models import CharLM, ViT


def default_encodings(num_axes: int) -> tuple[str, ...]:
    """The RoPE baseline of every ratio first, then every registered encoding that supports ``num_axes`` (its
    example spec, ``liere.encoding_info``), the rest of the default comparison (LieRE-64,
    ``liere.factory.default_comparison``) and the official LieRE recipe (``reference``)."""
    baseline = "rope" if num_axes == 1 else "axial-rope"
    examples = [spec for spec in registry_examples(num_axes) if spec != baseline]
    rest = [spec for spec in default_comparison(num_axes) if spec not in (baseline, *examples)]
    return (baseline, *examples, *rest, "reference")


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
        super().__init__(head_dim=head_dim, num_axes=num_axes, depth=depth)
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
        """The default encodings of this model (``default_encodings`` of its number of axes)."""
        return default_encodings(1 if self.kind == "lm" else 3 if "frames" in self.config else 2)

    @property
    def baseline(self) -> str:
        """The RoPE baseline of every ratio: RoPE for the char-LM, axial RoPE for ViTs."""
        return self.encodings[0]


def settings(size: str) -> list[Setting]:
    if size == "small":
        small = dict(dim=192, depth=6, heads=3)
        return [
            Setting("ViT 192x6 CIFAR 32px/4", "vit", dict(image=32, patch=4, classes=100, **small), 32),
            Setting(
                "ViT 192x6 3D 8x14x14", "vit", dict(image=112, patch=8, frames=16, tubelet=2, classes=100, **small), 8
            ),
        ]
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
        return ViT(image_shape(setting), cfg["classes"], patch_size(setting), encoding=pe, **dims)
    return CharLM(256, cfg["context"], encoding=pe, **dims)


def image_shape(setting: Setting) -> tuple[int, ...]:
    """``(C, H, W)``, or ``(C, T, H, W)`` for settings with ``frames``."""
    cfg = setting.config
    return (3, *([cfg["frames"]] if "frames" in cfg else []), cfg["image"], cfg["image"])


def patch_size(setting: Setting) -> tuple[int, ...]:
    cfg = setting.config
    return (*([cfg["tubelet"]] if "tubelet" in cfg else []), cfg["patch"], cfg["patch"])


def inputs(setting: Setting, device: torch.device) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    if setting.kind == "vit":
        classes = setting.config["classes"]
        x = torch.randn(setting.batch, *image_shape(setting), generator=gen)
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


ROOT = Path(__file__).resolve().parents[1]
CLEAR_REFS = Path("/proc/self/clear_refs")  # writing "5" resets the kernel's peak-RSS counter (Linux)


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def first_step_peak_rise_mib(setting: Setting, encoding: str, bf16: bool) -> float:
    """In this process (CPU, Linux): build the model, its inputs and optimizer, reset the peak-RSS counter, run
    one training step, and return by how many MiB the peak RSS rose above the RSS at the reset (activations,
    gradients, optimizer state and every transient of the step)."""
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    x, y = inputs(setting, cpu)
    step = train_step(build_model(setting, encoding), x, y, autocast(cpu, bf16), False)
    gc.collect()
    CLEAR_REFS.write_text("5")
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024


def peak_rise_mib(setting: Setting, encoding: str, device: torch.device, bf16: bool) -> float | None:
    """``first_step_peak_rise_mib`` in a fresh Python process (same interpreter, environment and checkout);
    ``None`` off Linux or on CUDA (where ``peak_mib`` is the allocator's peak)."""
    if device.type != "cpu" or not CLEAR_REFS.exists():
        return None
    code = (
        "import json, sys; from bench.step import Setting, first_step_peak_rise_mib; "
        "a = json.loads(sys.argv[1]); "
        "print(first_step_peak_rise_mib(Setting(**a['setting']), a['encoding'], a['bf16']))"
    )
    arg = json.dumps(dict(setting=dataclasses.asdict(setting), encoding=encoding, bf16=bf16))
    done = subprocess.run([sys.executable, "-c", code, arg], cwd=ROOT, capture_output=True, text=True, env=os.environ)
    if done.returncode:
        raise RuntimeError(f"peak-memory process for {encoding} on {setting.name} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


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

    ``args``: the command line's ``compile``, ``repeats``, ``bf16``, ``memory_only`` and ``peak``.
    """
    x, y = inputs(setting, device)
    steps, peak, saved, rise = {}, {}, {}, {}
    for encoding in encodings:
        rise[encoding] = peak_rise_mib(setting, encoding, device, args.bf16) if args.peak else None
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
    baseline = setting.baseline
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
                peak_rise_mib=None if compiled else rise[encoding],
                peak_rise_ratio=None if compiled or rise[encoding] is None else rise[encoding] / rise[baseline],
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
    ("peak_rise_mib", "first-step peak rise MiB"),
    ("peak_rise_ratio", "peak rise / RoPE"),
]


def fit_line(batches: Sequence[int], times: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``t = a + b * batch``: ``(a, b, residual)``, the residual the largest ``|t - fit| / t``."""
    n = len(batches)
    mean_b, mean_t = sum(batches) / n, sum(times) / n
    slope = sum((b - mean_b) * (t - mean_t) for b, t in zip(batches, times, strict=True)) / sum(
        (b - mean_b) ** 2 for b in batches
    )
    a = mean_t - slope * mean_b
    return a, slope, max(abs(t - a - slope * b) / t for b, t in zip(batches, times, strict=True))


def fit_setting(
    setting: Setting, encodings: Sequence[str], device: torch.device, args: argparse.Namespace
) -> list[dict]:
    """Step times at every ``--fit`` batch (and the ``--check-batch``), all timed round-robin in one run, one
    line ``t(B) = a + b B`` per encoding, and the ratio to the RoPE baseline it predicts at the setting's real
    batch, beside the ratio measured at the smallest batch and (``--check-batch``) the measured and predicted
    ratios at a larger batch with the line's error there. With ``--compile`` every encoding is fitted eager and
    ``torch.compile``d, each compared with the baseline run the same way."""
    batches = sorted({*args.fit, *([args.check_batch] if args.check_batch else [])})
    variants = (False, True) if args.compile else (False,)
    steps = {}
    for encoding in encodings:
        torch.manual_seed(0)
        model = build_model(setting, encoding).to(device)
        for compiled in variants:
            for batch in batches:
                x, y = inputs(dataclasses.replace(setting, batch=batch), device)
                steps[encoding, compiled, batch] = train_step(model, x, y, autocast(device, args.bf16), compiled)
    times = time_ms(steps, device, args.repeats)
    lines = {(e, c): fit_line(args.fit, [times[e, c, b] for b in args.fit]) for e in encodings for c in variants}

    def predict(encoding: str, compiled: bool, batch: int) -> float:
        a, slope, _ = lines[encoding, compiled]
        return a + slope * batch

    baseline, low, check = setting.baseline, min(args.fit), args.check_batch
    rows = []
    for compiled in variants:
        for encoding in encodings:
            a, slope, residual = lines[encoding, compiled]
            row = dict(
                model=setting.name,
                encoding=encoding,
                compiled=compiled,
                fixed_ms=a,
                per_sample_ms=slope,
                residual=residual,
                small_batch=low,
                small_ratio=times[encoding, compiled, low] / times[baseline, compiled, low],
                real_batch=setting.batch,
                predicted_ratio=predict(encoding, compiled, setting.batch) / predict(baseline, compiled, setting.batch),
            )
            if check:
                row |= dict(
                    check_batch=check,
                    check_ratio=times[encoding, compiled, check] / times[baseline, compiled, check],
                    check_predicted_ratio=predict(encoding, compiled, check) / predict(baseline, compiled, check),
                    check_error=predict(encoding, compiled, check) / times[encoding, compiled, check] - 1,
                )
            rows.append(row)
    return rows


FIT_COLUMNS = [
    ("model", "model"),
    ("encoding", "encoding"),
    ("compiled", "compiled"),
    ("fixed_ms", "a (ms)"),
    ("per_sample_ms", "b (ms/sample)"),
    ("residual", "fit residual"),
    ("small_batch", "small batch"),
    ("small_ratio", "measured / RoPE there"),
    ("real_batch", "real batch"),
    ("predicted_ratio", "predicted / RoPE there"),
    ("check_batch", "check batch"),
    ("check_ratio", "measured / RoPE at check"),
    ("check_predicted_ratio", "predicted / RoPE at check"),
    ("check_error", "t predicted / measured - 1 at check"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("python -m bench.step", __doc__.split("\n")[0], ("tiny", "small", "real"), "steps per model")
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
    parser.add_argument("--depth", type=int, help="override every model's depth (per-layer costs scale with it)")
    parser.add_argument("--memory-only", action="store_true", help="measure memory only, no timing")
    parser.add_argument(
        "--peak",
        action="store_true",
        help="also measure each encoding's first-step peak memory rise in a fresh process (CPU, Linux: peak RSS)",
    )
    parser.add_argument(
        "--fit",
        nargs="+",
        type=int,
        metavar="B",
        help="fit step time t(B) = a + b B from these batch sizes (2 or 3, timed round-robin in one run) and "
        "predict each encoding's ratio to RoPE at the model's real batch",
    )
    parser.add_argument("--check-batch", type=int, help="with --fit: also time this batch and compare with the line")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fit is not None and (len(set(args.fit)) < 2 or min(args.fit) < 1):
        parser.error(f"--fit needs at least two distinct positive batch sizes, got {args.fit}")
    if args.check_batch is not None and args.fit is None:
        parser.error("--check-batch needs --fit")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print a markdown table, return (and optionally write) the results."""
    args = parse_args(argv)
    device = torch.device(args.device)
    size = args.size or default_size(device)
    results: dict = dict(device=describe(device), size=size, rows=[])
    print(f"# liere model benchmark: {results['device']}, size {size}\n", flush=True)
    for setting in settings(size):
        if args.models and not any(m in setting.name for m in args.models):
            continue
        if args.batch is not None:
            setting = dataclasses.replace(setting, batch=check_positive_int(args.batch, "--batch"))
        if args.depth is not None:
            setting = dataclasses.replace(setting, config=setting.config | dict(depth=args.depth))
        base = setting.baseline
        encodings = (
            list(setting.encodings) if args.encodings is None else [base, *(e for e in args.encodings if e != base)]
        )
        if args.fit:
            rows = fit_setting(setting, encodings, device, args)
            print(markdown_table(rows, FIT_COLUMNS) + "\n", flush=True)
        else:
            rows = bench_setting(setting, encodings, device, args)
            print(markdown_table(rows, COLUMNS) + "\n", flush=True)
        results["rows"] += rows
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
