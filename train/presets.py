"""Run configuration and the named presets (smoke / cpu / gpu / paper) that fill it for a task."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from liere.encoding import check_positive_int
from train import data

# Fields that do not change the training trajectory: left out of the config hash that guards resumption.
RUNTIME_FIELDS = ("device", "compile", "eval_every", "eval_samples", "ckpt_every", "log_every")


def is_text(task: str) -> bool:
    """Whether ``task`` is a char-LM task (a text dataset of ``train.data``)."""
    return data.is_text(task)


@dataclass
class RunConfig:
    """Everything that defines one training run (one task, one encoding, one seed).

    ``data_options`` go to ``train.data.load_dataset``; ``model_options`` to the model class (``ViT`` or
    ``CharLM``) besides the data-derived shapes and ``encoding`` (for text they include ``context``).
    ``eval_samples`` caps evaluation at that many images (or tokens for text). Image tasks without a
    ``patch_size`` in ``model_options`` get the smallest patch giving at most ``max_grid`` patches per axis.
    ``train_fraction`` < 1 trains on a seeded subset of the training split (``train.tasks.train_subset``).
    """

    task: str = data.DEFAULT_DATASET
    encoding: str = "liere8"
    seed: int = 0
    data_seed: int = 0
    data_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_samples: int = 2000
    ckpt_every: int = 200
    log_every: int = 10
    device: str = "auto"
    compile: bool = False
    max_grid: int = 8
    train_fraction: float = 1.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_samples", "ckpt_every", "log_every", "max_grid"):
            check_positive_int(getattr(self, name), name)
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def trajectory(self) -> dict[str, Any]:
        """The fields that determine the training trajectory (hashed to check a resumed run is the same run).

        ``train_fraction`` is left out at its default 1.0, so runs from before it existed still resume.
        """
        fields = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}
        if self.train_fraction == 1.0:
            del fields["train_fraction"]
        return fields


@dataclass(frozen=True)
class Preset:
    """Model size and budget at one scale (each dataset declares its data sizes per preset:
    ``train.data.Source.preset_options``). ``max_grid`` caps patches per axis (patch-size choice)."""

    vit: dict[str, Any]
    lm: dict[str, Any]
    max_grid: int
    training: dict[str, Any]


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        vit=dict(dim=64, depth=2, heads=1, weight_init="xavier"),  # one 64-wide head: the defaults include liere64
        lm=dict(dim=64, depth=2, heads=1, context=32),
        max_grid=4,
        training=dict(steps=30, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=15, eval_samples=256,
                      ckpt_every=15, log_every=5),
    ),
    "cpu": Preset(
        # One 64-wide head, so that liere64 (dense LieRE) fits. xavier init: with timm's std 0.02 at width 64 the
        # attention logits start ~20x smaller and every rotary encoding stalls near 30% on some arrow seeds
        # (RESULTS.md, "Stability"); with xavier each of them solves arrow on every seed tried.
        vit=dict(dim=64, depth=4, heads=1, weight_init="xavier"),
        lm=dict(dim=64, depth=4, heads=1, context=128),
        max_grid=8,
        # lr 1e-3: at 2e-3 fixed axial RoPE stalls near chance on arrow in most seeds (RESULTS.md, "Stability")
        training=dict(steps=600, batch_size=64, lr=1e-3, warmup_steps=50, eval_every=100, eval_samples=1000,
                      ckpt_every=200, log_every=10),
    ),
    "gpu": Preset(
        vit=dict(dim=384, depth=6, heads=6),
        lm=dict(dim=384, depth=6, heads=6, context=256),
        max_grid=16,
        training=dict(steps=5000, batch_size=256, lr=5e-4, warmup_steps=250, eval_every=500, eval_samples=5000,
                      ckpt_every=500, log_every=20),
    ),
    "paper": Preset(  # ViT-B on the paper's 108 px / 9x9 / 12 px-cell arrow task
        vit=dict(size="base"),
        lm=dict(dim=768, depth=12, heads=12, context=512),
        max_grid=16,
        training=dict(steps=40000, batch_size=256, lr=1e-4, warmup_steps=2000, eval_every=2000, eval_samples=10000,
                      ckpt_every=1000, log_every=50),
    ),
}  # fmt: skip


def default_patch(spatial: tuple[int, ...], max_grid: int) -> tuple[int, ...]:
    """Per axis, the smallest divisor of the size giving at most ``max_grid`` patches along that axis."""
    return tuple(next(p for p in range(1, s + 1) if s % p == 0 and s // p <= max_grid) for s in spatial)


def preset_config(
    preset: str,
    task: str,
    weight_init: str | None = None,
    data_overrides: dict[str, Any] | None = None,
    **overrides: Any,
) -> RunConfig:
    """The ``RunConfig`` of ``preset`` for ``task``; ``overrides`` replace fields (``None`` values are ignored),
    ``data_overrides`` the dataset's options at this preset (``train.data.preset_options``) and ``weight_init``
    the model's init scheme (``models.blocks.WEIGHT_INITS``).

    Image patch sizes are chosen later, from the loaded data's shape (``patch_size`` in ``model_options``
    when the preset or the dataset fixes it: ``train.data.model_defaults``, e.g. the arrow task's cell size).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    data_options = data.preset_options(task, preset) | (data_overrides or {})
    model_options = dict(p.lm if is_text(task) else p.vit) | data.model_defaults(task, data_options)
    if weight_init is not None:
        model_options["weight_init"] = weight_init
    fields = dict(task=task, data_options=data_options, model_options=model_options, max_grid=p.max_grid, **p.training)
    fields |= {k: v for k, v in overrides.items() if v is not None}
    if "warmup_steps" not in overrides:  # keep the preset's warmup share when only the step budget changes
        fields["warmup_steps"] = min(fields["warmup_steps"], fields["steps"] // 10)
    return RunConfig(**fields)
