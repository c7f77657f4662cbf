"""Evaluations of trained runs: per-example test correctness, patch shuffle, resolution and length extrapolation.

    python -m train.ab.evaluate runs/ab-arrow-20260101-120000          # every run of an A/B folder, then its report
    python -m train.ab.evaluate runs/x/liere8-s0/last.pt --evaluate shuffle,extrapolate --extrapolate 1,1.5,2

Each run folder gets ``evaluation.json`` (``{"shuffle": {...}, "extrapolate": [...], "length": [...]}``,
whatever was asked) and, for classification, ``test_correct.pt`` (bool ``(N,)``: was test example i right),
which the report pairs across encodings (McNemar). Evaluations recompute from checkpoints, so old run
folders can be evaluated too.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from liere import extension
from models.vit import COORD_SCALES
from train import cli, data, run_checkpoint, torch_files
from train import run_dir as layout
from train.ab import report
from train.distributed import resolve_device
from train.presets import RunConfig, is_text
from train.summaries import AbResults, RunSummary
from train.tasks import Task, _generator, autocast, load_task

EVALUATIONS = ("shuffle", "extrapolate", "length", "extension")
EXTENSION_METHODS = ("none", "pi", "ntk", "yarn", "dynamic")
DEFAULT_FACTORS = (1.0, 1.5, 2.0)
DEFAULT_MULTIPLES = (1, 2, 4)


def parse_list(text: str, name: str, kind: Callable[[str], Any] = float) -> list[Any]:
    """``"1,1.5,2"`` -> [1.0, 1.5, 2.0]; raises ValueError naming the option ``name`` otherwise."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ValueError(f"{name}: expected comma-separated numbers, got {text!r}") from err
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{name}: expected positive numbers, got {text!r}")
    return values


def parse_evaluations(text: str, task: str) -> list[str]:
    """``--evaluate`` value -> evaluation names; ``"default"`` is shuffle+extrapolate (vision) or length (text)."""
    if text == "default":
        return ["length"] if is_text(task) else ["shuffle", "extrapolate"]
    names = [] if text == "none" else [n.strip() for n in text.split(",") if n.strip()]
    allowed = ("length", "extension") if is_text(task) else ("shuffle", "extrapolate", "extension")
    if bad := [n for n in names if n not in allowed]:
        raise ValueError(f"--evaluate: {bad} do not apply to task {task!r}; choose from {allowed} or 'none'")
    return names


# ---------------------------------------------------------------- patches


def patchify(images: Tensor, patch: Sequence[int]) -> Tensor:
    """``(B, C, *spatial)`` -> patches ``(B, N, C, *patch)`` in row-major grid order (the ViT's token order)."""
    b, c, *spatial = images.shape
    grid = [s // p for s, p in zip(spatial, patch, strict=True)]
    split = [d for g, p in zip(grid, patch, strict=True) for d in (g, p)]
    k = len(patch)
    order = [0, *(2 + 2 * i for i in range(k)), 1, *(3 + 2 * i for i in range(k))]
    return images.reshape(b, c, *split).permute(order).reshape(b, math.prod(grid), c, *patch)


def unpatchify(patches: Tensor, grid: Sequence[int]) -> Tensor:
    """Inverse of ``patchify``: ``(B, N, C, *patch)`` with ``N = prod(grid)`` -> ``(B, C, *spatial)``."""
    b, _, c, *patch = patches.shape
    k = len(patch)
    x = patches.reshape(b, *grid, c, *patch)
    order = [0, k + 1, *(d for i in range(k) for d in (1 + i, k + 2 + i))]
    return x.permute(order).reshape(b, c, *(g * p for g, p in zip(grid, patch, strict=True)))


def patch_permutations(count: int, num_patches: int, seed: int = 0, offset: int = 0) -> Tensor:
    """``(count, num_patches)`` permutations; row i is fixed by ``(seed, offset + i)`` (the test example index)."""
    return torch.stack([torch.randperm(num_patches, generator=_generator(seed, offset + i)) for i in range(count)])


def permute_patches(images: Tensor, patch: Sequence[int], perms: Tensor) -> Tensor:
    """Images ``(B, C, *spatial)`` whose patch ``j`` is input patch ``perms[:, j]`` (clips: tubelets)."""
    grid = [s // p for s, p in zip(images.shape[2:], patch, strict=True)]
    patches = patchify(images, patch)
    index = perms.to(images.device).reshape(*perms.shape, *[1] * (patches.dim() - 2)).expand_as(patches)
    return unpatchify(patches.gather(1, index), grid)


# ---------------------------------------------------------------- vision


@torch.no_grad()
def correct_predictions(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    limit: int,
    transform: Callable[[Tensor, int], Tensor] | None = None,
    batch_size: int = 128,
) -> Tensor:
    """Bool ``(min(len, limit),)``: whether ``model`` classifies each of the first test examples correctly.

    ``transform(images, offset)`` changes a batch first (``offset``: index of its first example).
    """
    loader = DataLoader(Subset(dataset, range(min(len(dataset), limit))), batch_size=batch_size)
    correct, offset = [], 0
    for x, y in loader:
        x = transform(x, offset) if transform is not None else x
        with autocast(device):
            logits = model(x.to(device))
        correct.append((logits.argmax(-1).cpu() == y).cpu())
        offset += len(y)
    return torch.cat(correct)


def shuffle_eval(model: nn.Module, dataset: Dataset, device: torch.device, limit: int, seed: int = 0) -> dict:
    """Test accuracy with each image's patches permuted (a fixed seeded permutation per image) and the drop."""
    patch = model.patch_size

    def shuffle(x: Tensor, offset: int) -> Tensor:
        num_patches = math.prod(s // p for s, p in zip(x.shape[2:], patch, strict=True))
        return permute_patches(x, patch, patch_permutations(len(x), num_patches, seed, offset))

    plain = correct_predictions(model, dataset, device, limit).float().mean().item()
    shuffled = correct_predictions(model, dataset, device, limit, shuffle).float().mean().item()
    return {"accuracy": plain, "shuffled_accuracy": shuffled, "drop": plain - shuffled, "seed": seed}


def resized_shape(spatial: Sequence[int], patch: Sequence[int], factor: float) -> tuple[list[int], bool]:
    """Spatial size scaled by ``factor`` on the last two axes (H, W; a clip's T stays), rounded to whole patches.

    Returns the size and whether rounding changed it from ``factor * size``.
    """
    size, rounded = list(spatial), False
    for axis in range(len(spatial) - 2, len(spatial)):
        exact = spatial[axis] * factor
        size[axis] = max(1, round(exact / patch[axis])) * patch[axis]
        rounded |= not math.isclose(size[axis], exact)
    return size, rounded


def resize_images(images: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear (2D) or trilinear (3D clips, T unchanged) resize of ``(B, C, *spatial)`` to ``size``."""
    if list(images.shape[2:]) == list(size):
        return images
    mode = "bilinear" if images.dim() == 4 else "trilinear"
    return F.interpolate(images, size=tuple(size), mode=mode, align_corners=False)


def _coord_scale_accuracies(model: nn.Module, dataset: Dataset, device: torch.device, limit: int,
                            transform: Callable[[Tensor, int], Tensor] | None) -> dict[str, float]:  # fmt: skip
    """Accuracy under each ``coord_scale`` mode (the model's own mode is restored)."""
    original, accuracies = model.coord_scale, {}
    try:
        for mode in COORD_SCALES:
            model.coord_scale = mode
            accuracies[mode] = correct_predictions(model, dataset, device, limit, transform).float().mean().item()
    finally:
        model.coord_scale = original
    return accuracies


def extrapolate_eval(
    model: nn.Module, dataset: Dataset, device: torch.device, limit: int, factors: Sequence[float]
) -> list[dict[str, Any]]:
    """Accuracy on test images resized by each factor, under both ``coord_scale`` modes (``kind="resize"``)."""
    spatial = list(dataset[0][0].shape[1:])
    records = []
    for factor in factors:
        size, rounded = resized_shape(spatial, model.patch_size, factor)
        accuracies = _coord_scale_accuracies(model, dataset, device, limit, lambda x, _, s=size: resize_images(x, s))
        grid = [s // p for s, p in zip(size, model.patch_size, strict=True)]
        records += [{"kind": "resize", "factor": factor, "mode": mode, "size": size, "grid": grid,
                     "rounded": rounded, "accuracy": acc} for mode, acc in accuracies.items()]  # fmt: skip
    return records


def dataset_extrapolation_eval(
    model: nn.Module, config: RunConfig, device: torch.device, limit: int, factors: Sequence[float]
) -> list[dict[str, Any]]:
    """The dataset's own extrapolation test sets (``train.data.extrapolation_set``, e.g. the arrow task on a
    larger canvas with the same cell size) at each factor, both modes; [] for datasets without one."""
    records = []
    for factor in factors:
        found = data.extrapolation_set(config.task, config.data_options, factor, seed=config.data_seed)
        if found is None:
            return []
        test, info = found
        accuracies = _coord_scale_accuracies(model, test, device, limit, None)
        records += [{"kind": info["kind"], "factor": factor, "mode": mode, **info, "accuracy": acc}
                    for mode, acc in accuracies.items()]  # fmt: skip
    return records


# ---------------------------------------------------------------- text


@torch.no_grad()
def length_eval(
    model: nn.Module, tokens: Tensor, context: int, multiples: Sequence[int], device: torch.device, limit: int
) -> list[dict[str, Any]]:
    """Bits per character over the same test tokens in windows of ``m * context`` tokens for each multiple ``m``.

    Scores the first ``max(limit, 8 * max(multiples) * context)`` tokens (8 windows at the longest length,
    when the split has them), cut to a whole number of windows of every length, so each length sees the
    same tokens.
    """
    unit = math.lcm(*multiples) * context
    span = min(len(tokens) - 1, max(limit, 8 * max(multiples) * context)) // unit * unit
    if span == 0:
        raise ValueError(f"length_eval: {len(tokens)} test tokens are too few for windows of {unit} tokens")
    records = []
    for multiple in multiples:
        length = multiple * context
        starts = torch.arange(0, span, length)
        nll, count = 0.0, 0
        for chunk in starts.split(max(1, 8192 // length)):
            window = tokens[chunk[:, None] + torch.arange(length + 1)]
            x, y = window[:, :-1].to(device), window[:, 1:].to(device)
            with autocast(device):
                logits = model(x)
            nll += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            count += y.numel()
        records.append({"multiple": multiple, "length": length, "tokens": count, "bpc": nll / count / math.log(2)})
    return records


# ---------------------------------------------------------------- extension at test time


def extension_parameters(method: str, factor: float, original: int) -> dict[str, Any] | None:
    """Hugging Face ``rope_parameters`` of extension ``method`` for ``factor`` times the trained extent ``original``
    (None for ``none``): ``pi`` = linear, ``ntk`` = NTK-aware base ``theta * factor ** (d / (d - 2))`` (``dynamic``
    with factor 1 at the extended length), ``yarn``, ``dynamic`` = dynamic NTK with factor 2."""
    if method not in EXTENSION_METHODS:
        raise ValueError(f"--extend: unknown method {method!r}; choose from {', '.join(EXTENSION_METHODS)}")
    return {
        "none": None,
        "pi": {"rope_type": "linear", "factor": float(factor)},
        "ntk": {"rope_type": "dynamic", "factor": 1.0, "original_max_position_embeddings": original},
        "yarn": {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original},
        "dynamic": {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": original},
    }[method]


def extension_methods(model: nn.Module, methods: Sequence[str]) -> list[str]:
    """``methods`` if ``model.encoding`` is rotary, else ``["none"]`` (nothing to extend)."""
    return list(methods) if extension.is_rotary(model.encoding) else ["none"]


def with_extension(model: nn.Module, method: str, factor: float, originals: Sequence[int]) -> nn.Module:
    """``model`` with its encoding extended by ``method`` (per axis: ``factor`` x ``originals[axis]``)."""
    params = [extension_parameters(method, factor, o) for o in originals]
    if params[0] is None:
        return model
    extended = copy.copy(model)
    extended._modules = dict(model._modules) | {"encoding": extension.extend(model.encoding, params)}
    return extended


@torch.no_grad()
def extension_length_eval(
    model: nn.Module, tokens: Tensor, context: int, multiples: Sequence[int], device: torch.device, limit: int,
    methods: Sequence[str] = EXTENSION_METHODS,
) -> list[dict[str, Any]]:  # fmt: skip
    """``length_eval`` with the encoding extended by each method to each multiple of the training ``context``, over
    the same tokens as ``length_eval`` scores."""
    unit = math.lcm(*multiples) * context
    span = min(len(tokens) - 1, max(limit, 8 * max(multiples) * context)) // unit * unit
    records, trained = [], None
    for method in extension_methods(model, methods):
        for multiple in multiples:
            if multiple == 1 and trained is not None:  # every rule is the identity at the trained length
                records.append(trained | {"method": method})
                continue
            extended = with_extension(model, method, multiple, [context]).to(device)
            (record,) = length_eval(extended, tokens, multiple * context, [1], device, span)
            records.append({"method": method, "multiple": multiple, "length": record["length"], "bpc": record["bpc"]})
            trained = records[-1] if multiple == 1 else trained
    return records


def extension_canvas_eval(
    model: nn.Module, config: RunConfig, grid: Sequence[int], device: torch.device, limit: int,
    factors: Sequence[float], methods: Sequence[str] = EXTENSION_METHODS,
) -> list[dict[str, Any]]:  # fmt: skip
    """Accuracy on the dataset's own larger-canvas test sets (``index`` coordinates) with the encoding extended by
    each method per axis from the trained patch ``grid``; [] for datasets without such sets."""
    records, original = [], model.coord_scale
    model.coord_scale = "index"
    try:
        for factor in factors:
            found = data.extrapolation_set(config.task, config.data_options, factor, seed=config.data_seed)
            if found is None:
                return []
            test, info = found
            for method in extension_methods(model, methods):
                extended = with_extension(model, method, factor, grid)
                accuracy = correct_predictions(extended, test, device, limit).float().mean().item()
                records.append({"method": method, "factor": factor, "kind": info["kind"], "accuracy": accuracy})
    finally:
        model.coord_scale = original
    return records


# ---------------------------------------------------------------- runs


def evaluate_run(
    model: nn.Module,
    task: Task,
    run_dir: str | Path,
    evaluations: Sequence[str],
    factors: Sequence[float] = DEFAULT_FACTORS,
    multiples: Sequence[int] = DEFAULT_MULTIPLES,
    device: torch.device | str = "cpu",
    methods: Sequence[str] = EXTENSION_METHODS,
) -> dict[str, Any]:
    """Run ``evaluations`` on a trained model; write ``evaluation.json`` (and ``test_correct.pt``) into ``run_dir``."""
    run_dir, device = Path(run_dir), torch.device(device)
    model = model.to(device).eval()
    limit, config, result = task.config.eval_samples, task.config, {}
    if not task.correct_per_example:
        if "length" in evaluations:
            context = task.model_spec["kwargs"]["context"]
            result["length"] = length_eval(model, task.splits.test, context, multiples, device, limit)
        if "extension" in evaluations:
            context = task.model_spec["kwargs"]["context"]
            result["extension"] = extension_length_eval(
                model, task.splits.test, context, multiples, device, limit, methods
            )
    else:
        torch_files.save(correct_predictions(model, task.splits.test, device, limit), run_dir / layout.CORRECT)
        if "shuffle" in evaluations:
            result["shuffle"] = shuffle_eval(model, task.splits.test, device, limit)
        if "extrapolate" in evaluations:
            result["extrapolate"] = extrapolate_eval(model, task.splits.test, device, limit, factors)
            result["extrapolate"] += dataset_extrapolation_eval(model, config, device, limit, factors)
        if "extension" in evaluations:
            grid = [s // p for s, p in zip(task.splits.test[0][0].shape[1:], model.patch_size, strict=True)]
            result["extension"] = extension_canvas_eval(model, config, grid, device, limit, factors, methods)
    layout.write_json(run_dir / layout.EVALUATION, result)
    return result


def run_config(run_dir: Path, state: dict[str, Any]) -> RunConfig:
    """The run's full config: ``summary.json``'s when present, else the checkpoint's (runtime fields defaulted)."""
    summary = run_dir / layout.SUMMARY
    source = summary if summary.is_file() else run_checkpoint.find(run_dir)
    fields = RunSummary.load(summary).config if summary.is_file() else dict(state["config"])
    if not isinstance(fields, dict):
        raise layout.RunFolderError(f"{source}: its run config is not a JSON object")
    fields.pop("world_size", None)
    if unknown := sorted(set(map(str, fields)) - {f.name for f in dataclasses.fields(RunConfig)}):
        raise layout.RunFolderError(f"{source}: unknown run config fields {unknown}")
    return RunConfig(**fields)


def _checkpoints(path: Path) -> tuple[list[Path], Path | None]:
    """Checkpoints named by a CLI path (a checkpoint, a run folder or an A/B folder) and the A/B folder if any."""
    if path.is_file():
        return [path], None
    if not path.exists():
        raise layout.RunFolderError(f"{path} does not exist; pass an A/B folder, a run folder or a checkpoint file")
    if (path / layout.RESULTS_JSON).is_file():
        results = AbResults.load(path)
        runs = [path / r.run_dir for r in results.main_runs() if not r.diverged]
        return [_run_checkpoint(run) for run in runs], path
    return [_run_checkpoint(path)], None


def _run_checkpoint(run_dir: Path) -> Path:
    """The checkpoint of a run folder (single-file or ``--fsdp``); ``RunFolderError`` naming it when there is none."""
    if (found := run_checkpoint.find(run_dir)) is None:
        raise layout.RunFolderError(
            f"{run_dir} holds no {layout.LAST}, {layout.LAST_DCP}/ or {layout.RESULTS_JSON}: pass an A/B folder "
            "(train.ab), a run folder (train) or a checkpoint file"
        )
    return found


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.ab.evaluate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )  # fmt: skip
    p.add_argument("paths", nargs="+", help="A/B run folders (results.json), run folders or checkpoint files")
    p.add_argument("--evaluate", default="default",
                   help="comma-separated: shuffle, extrapolate (vision), length (text), or 'none'.\n"
                        "Default: shuffle,extrapolate for vision, length for text")  # fmt: skip
    p.add_argument("--extrapolate", default="1.0,1.5,2.0", help="image scale factors (default: 1.0,1.5,2.0)")
    p.add_argument("--lengths", default="1,2,4", help="context multiples for text (default: 1,2,4)")
    p.add_argument(
        "--extend",
        default=",".join(EXTENSION_METHODS),
        help=f"extension methods of the 'extension' evaluation (default: {','.join(EXTENSION_METHODS)})",
    )
    p.add_argument("--eval-samples", type=int, help="test examples (tokens for text); default: the run's eval_samples")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--reference", help=f"reference encoding of the rebuilt report (default: {report.REFERENCE_HELP})")
    cli.add_common_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Evaluate every checkpoint named in ``argv``; rebuild the report of each A/B folder. Returns the results."""
    args = parser().parse_args(argv)
    factors = parse_list(args.extrapolate, "--extrapolate")
    multiples = parse_list(args.lengths, "--lengths", int)
    methods = [m.strip() for m in args.extend.split(",") if m.strip()]
    for method in methods:
        extension_parameters(method, 1.0, 1)
    device = resolve_device(args.device)
    tasks: dict[str, Task] = {}
    results = []
    for path in map(Path, args.paths):
        paths, ab_folder = _checkpoints(path)
        for ckpt in paths:
            state = run_checkpoint.read(ckpt)
            config = run_config(ckpt.parent, state)
            if args.eval_samples is not None:
                config = RunConfig(**(config.to_dict() | {"eval_samples": args.eval_samples}))
            key = json.dumps([config.task, config.data_seed, config.data_options, config.eval_samples])
            task = tasks.setdefault(key, load_task(config))
            model = run_checkpoint.load_model(ckpt)
            names = parse_evaluations(args.evaluate, config.task)
            results.append(evaluate_run(model, type(task)(config, task.splits, state["model_spec"]), ckpt.parent,
                                        names, factors, multiples, device, methods))  # fmt: skip
            print(f"[evaluate] {ckpt}: {json.dumps(results[-1])[:300]}", flush=True)
        if ab_folder is not None:
            print(f"report: {report.write_report(ab_folder, args.reference)}", flush=True)
    return results


if __name__ == "__main__":
    cli.run(main)
