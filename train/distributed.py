"""Devices and processes of a training run: the device (``resolve_device``), the ``torchrun`` process group and its
collectives (``init_distributed``, ``all_reduce``, ``all_gather``, naming silent ranks after a timeout), and FSDP2
(``torch.distributed.fsdp.fully_shard``) for ``python -m train --fsdp``.

The model is built on the ``meta`` device (no memory, no random numbers), sharded block by block and then as a
whole, moved to the device with ``to_empty`` and initialised by ``init_weights()``, which gives every rank its shard
of exactly the weights an unsharded build draws under the same seed. Parameters, gradients and optimizer state
are sharded over the ranks; buffers are replicated. On CUDA the blocks compute in bf16 (``MixedPrecisionPolicy``,
gradients reduced in fp32); on the CPU everything stays fp32. The position encoding is a shard group of its own
that always gathers fp32 parameters: its frequency and generator math runs in fp32 (``liere.precision``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import liere
from liere import PositionEncoding
from liere.factory import parse_spec
from train.presets import RunConfig, is_text
from train.tasks import Task

DDP_TIMEOUT_S = 600.0  # default process-group timeout (torch's own default is 30 minutes)


def init_single_process_group(device: torch.device) -> None:
    """A one-process group (no ``torchrun``), so that ``--fsdp`` also runs, and resumes, on one process."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def leave_process_group() -> None:
    """Destroy the process group at the end of a command, so that every rank shuts its backend down before the
    interpreter exits (left to interpreter teardown, a rank can abort while another is still closing)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 parameters and fp32 gradient reduction on CUDA; fp32 throughout elsewhere."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def check_shardable(config: RunConfig) -> None:
    """Raise ``ValueError`` (before any data is loaded) when ``config.encoding`` cannot be built on ``meta`` and
    initialised afterwards (an encoding whose ``initial_state()`` misses some of its tensors)."""
    options = config.model_options
    dim, heads, depth = (options.get(key) for key in ("dim", "heads", "depth"))
    if not all(isinstance(v, int) and v > 0 for v in (dim, heads, depth)) or dim % heads:
        return  # the model itself will report its sizes
    axes = 1 if is_text(config.task) else image_axes(config.encoding)
    sizes = dict(head_dim=dim // heads, num_heads=heads, depth=depth, dim=dim)
    try:
        with torch.device("meta"):
            encoding = liere.build(config.encoding, num_axes=axes, grid_shape=(2,) * axes, **sizes)
        with torch.random.fork_rng(devices=[]):
            encoding.to_empty(device="cpu").reset_parameters()
    except NotImplementedError as err:
        raise ValueError(f"--fsdp: encoding {config.encoding!r} cannot be sharded: {err}") from err


def image_axes(spec: str) -> int:
    """The first image grid rank (2 or 3) the encoding of ``spec`` supports (2 when unknown: ``build`` says why)."""
    name = parse_spec(spec)[0]
    infos = [liere.encoding_info(n) for n in liere.available()]
    supported = next((info.axes for info in infos if info.pattern.fullmatch(name)), (2,))
    return next((a for a in supported if a > 1), 2)


def build_sharded_model(task: Task, device: torch.device) -> nn.Module:
    """``task``'s model built on ``meta``, sharded with ``fully_shard`` (the encoding, each transformer block, then
    the whole model), materialised on ``device`` and initialised (seed the global RNG first, alike on every rank)."""
    with torch.device("meta"):
        model = task.build_model()
    blocks = getattr(getattr(model, "transformer", None), "blocks", None)
    if not callable(getattr(model, "init_weights", None)) or not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"--fsdp: {type(model).__name__} cannot be sharded: it needs init_weights() and transformer.blocks"
        )
    policy = mixed_precision(device)
    encoding = getattr(model, "encoding", None)
    if isinstance(encoding, PositionEncoding) and any(True for _ in encoding.parameters()):
        fully_shard(encoding, mp_policy=MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.to_empty(device=device)
    model.init_weights()
    return model


def sharded_modules(model: nn.Module) -> list[FSDPModule]:
    """The ``fully_shard``-ed modules of ``model`` (none for an unsharded model)."""
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, a sharded model holds its full parameters on every rank (plain tensors) and runs forwards without
    collectives, so ranks may evaluate different numbers of batches and read weights directly (metrics, hashes).
    Costs one full copy of the parameters per rank. A no-op for an unsharded model."""
    modules = sharded_modules(model)
    for module in modules:
        module.unshard()
        module.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        for module in modules:
            module.set_reshard_after_forward(True)
            module.reshard()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with full tensors, gathered on every rank when the model is sharded (a collective)."""
    if not sharded_modules(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


class RankTimeout(RuntimeError):
    """A collective operation timed out (``--ddp-timeout``): a rank stopped answering."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; under torchrun each process takes GPU ``local_rank``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device='cpu' or 'auto'")
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)


def init_distributed(device: torch.device, timeout_s: float = DDP_TIMEOUT_S) -> tuple[int, int]:
    """``(rank, world_size)``; joins the torchrun process group (nccl on CUDA, gloo on CPU) when launched by it.

    ``timeout_s`` bounds every collective: a rank that stops answering fails the others after that long.
    """
    if not timeout_s > 0:
        raise ValueError(f"--ddp-timeout: expected a positive number of seconds, got {timeout_s!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes (a no-op without a process group)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_gather(value: Any, world: int) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` without a process group. A collective."""
    if world == 1 or not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return values


def silent_ranks(rank: int, world: int, step: int, grace_s: float) -> list[int] | None:
    """After a collective timed out: the ranks that do not check in through the rendezvous store within
    ``grace_s`` seconds (live ranks time out too and check in). None if the store cannot be reached."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"liere/timeout/{rank}", str(step))
        deadline, others = time.monotonic() + grace_s, [r for r in range(world) if r != rank]
        while True:
            silent = [r for r in others if not store.check([f"liere/timeout/{r}"])]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.2)
    except Exception:  # the store itself may be gone with the stalled process
        return None
