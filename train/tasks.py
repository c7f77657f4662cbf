"""Task definitions: the data, the model to build, the seeded batch order and the evaluation metric.

Two kinds share one interface (``Task``): image/clip classification (``ViT``, metric accuracy) and
character language modelling (``CharLM``, metric bits per character). Batches depend only on
``(seed, step, rank, world_size)``, never on a running iterator, so a resumed run sees the same data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from models.registry import build_model
from models.registry import model_spec as stored_spec
from train import data
from train.presets import RunConfig, default_patch, is_text


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of non-negative ints (e.g. ``(seed, epoch)``)."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def per_rank(batch_size: int, world_size: int) -> int:
    """The per-process share of the global ``batch_size`` (which must divide evenly)."""
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes ({world_size})")
    return batch_size // world_size


class SeededOrder:
    """An endless sequence of epochs over ``n`` items, each a permutation drawn from ``(seed, epoch)``.

    Step ``s`` of a run with global batch ``B`` reads stream positions ``[s B, (s + 1) B)``; rank ``r`` of
    ``W`` takes every ``W``-th of them starting at ``r`` (the ``DistributedSampler`` split of that batch).
    """

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError("the training split is empty")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=_generator(self.seed, epoch))
        return self._perm

    def indices(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """Dataset indices of this rank's share of the global batch at ``step``."""
        positions = range(step * batch_size + rank, (step + 1) * batch_size, world_size)
        return [int(self._permutation(p // self.n)[p % self.n]) for p in positions]


def train_subset(n: int, fraction: float, seed: int) -> Tensor:
    """Indices of the first ``max(1, round(fraction * n))`` items of a permutation fixed by ``seed``.

    Depends only on ``(n, seed)`` and the fraction, so every encoding sees the same subset and smaller
    fractions are nested in larger ones.
    """
    return torch.randperm(n, generator=_generator(seed, n))[: max(1, round(fraction * n))]


class _StepBatches:
    """Batch sampler yielding ``SeededOrder`` index lists (this rank's share of the global ``batch_size``) for steps
    ``start, start + 1, ..., stop - 1``."""

    def __init__(self, order: SeededOrder, start: int, stop: int, batch_size: int, rank: int, world: int) -> None:
        self.order, self.start, self.stop = order, start, stop
        self.batch_size, self.rank, self.world = batch_size, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield self.order.indices(step, self.batch_size, self.rank, self.world)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


@dataclass
class Task:
    """A loaded task. ``model_spec`` (``{"model", "kwargs"}``, ``models.registry``) rebuilds the model, also from a
    checkpoint."""

    config: RunConfig
    splits: Any
    model_spec: dict[str, Any]

    metric = "accuracy"
    higher_is_better = True
    rate_unit = "images_per_s"  # throughput key of metrics.jsonl
    correct_per_example = True  # the evaluation saves per-example correctness (paired McNemar tests)

    @property
    def source(self) -> str:
        """Where the data came from (the data layer's description)."""
        return self.splits.source

    def build_model(self) -> nn.Module:
        """A freshly initialised model (draws from the global torch RNG: seed it first)."""
        return build_model(self.model_spec)

    def batches(self, start: int, rank: int = 0, world_size: int = 1, workers: int = 0) -> Iterator[tuple]:
        """``(x, y)`` CPU batches of this rank for steps ``start .. config.steps - 1``."""
        raise NotImplementedError

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy of logits ``(..., classes)`` against integer targets ``(...)``."""
        return F.cross_entropy(logits.flatten(0, -2).float(), y.flatten())

    def items(self, y: Tensor) -> int:
        """Number of images (or predicted tokens) in a batch, for throughput."""
        return y.numel()

    def eval_stats(self, model: nn.Module, split: str, device: torch.device, rank: int, world: int) -> Tensor:
        """Summed ``[loss, correct, count]`` of this rank's share of ``split`` (float64, on ``device``)."""
        raise NotImplementedError

    def summarize(self, stats: Tensor) -> dict[str, float]:
        """Metrics from all-reduced ``eval_stats``: mean loss and accuracy (or bits per character)."""
        loss, correct, count = stats.tolist()
        return {"loss": loss / count, self.metric: correct / count}


class ImageTask(Task):
    """Classification of images ``(C, H, W)`` or clips ``(C, T, H, W)`` with ``models.vit.ViT``."""

    def batches(self, start: int, rank: int = 0, world_size: int = 1, workers: int = 0) -> Iterator[tuple]:
        cfg, dataset = self.config, self.splits.train
        if cfg.train_fraction < 1:
            dataset = torch.utils.data.Subset(dataset, train_subset(len(dataset), cfg.train_fraction, cfg.data_seed))
        order = SeededOrder(len(dataset), cfg.seed)
        per_rank(cfg.batch_size, world_size)  # checks that the global batch splits evenly
        sampler = _StepBatches(order, start, cfg.steps, cfg.batch_size, rank, world_size)  # indices takes the global B
        return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=workers))

    @torch.no_grad()
    def eval_stats(self, model: nn.Module, split: str, device: torch.device, rank: int, world: int) -> Tensor:
        dataset = getattr(self.splits, split)
        indices = list(range(min(len(dataset), self.config.eval_samples)))[rank::world]
        stats = torch.zeros(3, dtype=torch.float64, device=device)
        loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=2 * self.config.batch_size)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with autocast(device):
                logits = model(x)
            stats += torch.stack([self.loss(logits, y) * len(y), (logits.argmax(-1) == y).sum(), torch.tensor(len(y))])
        return stats


class TextTask(Task):
    """Next-character prediction with ``models.lm.CharLM``; the metric is bits per character (lower is better).

    With ``train_fraction`` < 1 it trains on that leading share of the training text (nested across fractions).
    """

    metric = "bpc"
    higher_is_better = False
    rate_unit = "tokens_per_s"
    correct_per_example = False

    def batches(self, start: int, rank: int = 0, world_size: int = 1, workers: int = 0) -> Iterator[tuple]:
        cfg, context = self.config, self.model_spec["kwargs"]["context"]
        size = per_rank(cfg.batch_size, world_size)
        tokens = self.splits.train[: max(context + 1, round(cfg.train_fraction * len(self.splits.train)))]
        for step in range(start, cfg.steps):
            yield data.char_batches(tokens, context, size, _generator(cfg.seed, step, rank))

    @torch.no_grad()
    def eval_stats(self, model: nn.Module, split: str, device: torch.device, rank: int, world: int) -> Tensor:
        context = self.model_spec["kwargs"]["context"]
        tokens = getattr(self.splits, split)[: self.config.eval_samples + 1]
        windows = torch.arange(0, len(tokens) - 1, context)[rank::world]
        stats = torch.zeros(3, dtype=torch.float64, device=device)
        for chunk in windows.split(2 * self.config.batch_size):
            rows = [(tokens[i : i + context], tokens[i + 1 : i + 1 + context]) for i in chunk.tolist()]
            for x, y in _same_length(rows):
                x, y = x.to(device), y.to(device)
                with autocast(device):
                    logits = model(x)
                nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
                stats += torch.stack([nll, nll / math.log(2), torch.tensor(y.numel())])
        return stats


def _same_length(rows: list[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    """Stack ``(x, y)`` windows into batches; the last, shorter window of a split gets its own batch."""
    full = [r for r in rows if len(r[1]) == len(rows[0][1])]
    yield torch.stack([x for x, _ in full]), torch.stack([y for _, y in full])
    for x, y in rows[len(full) :]:
        if len(y):
            yield x[: len(y)].unsqueeze(0), y.unsqueeze(0)


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; disabled (fp32) elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def model_spec(config: RunConfig, splits: Any) -> dict[str, Any]:
    """The registered model name and keyword arguments (``models.registry``) for ``config`` on loaded ``splits``."""
    options = dict(config.model_options)
    if is_text(config.task):
        return stored_spec("charlm", vocab_size=len(splits.vocab), encoding=config.encoding, **options)
    image_shape = [int(s) for s in splits.image_shape]
    patch = options.pop("patch_size", None) or list(default_patch(tuple(image_shape[1:]), config.max_grid))
    kwargs = dict(image_shape=image_shape, num_classes=int(splits.num_classes), patch_size=patch, **options)
    return stored_spec("vit", **(kwargs | {"encoding": config.encoding}))


def load_task(config: RunConfig, root: str | None = None) -> Task:
    """Load the data of ``config.task`` (seeded by ``config.data_seed``) and describe its model."""
    kwargs = {"root": root} if root is not None else {}
    splits = data.load_dataset(config.task, seed=config.data_seed, **kwargs, **config.data_options)
    kind = TextTask if is_text(config.task) else ImageTask
    return kind(config, splits, model_spec(config, splits))


def with_encoding(task: Task, config: RunConfig) -> Task:
    """The same loaded data under another run config (another encoding or seed), without reloading."""
    if (config.task, config.data_seed, config.data_options) != (
        task.config.task,
        task.config.data_seed,
        task.config.data_options,
    ):
        raise ValueError("with_encoding: the new config must use the same task, data_seed and data_options")
    return type(task)(config, task.splits, model_spec(config, task.splits))
