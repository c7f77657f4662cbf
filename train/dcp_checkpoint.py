"""Sharded checkpoints of ``--fsdp`` runs with ``torch.distributed.checkpoint`` (DCP), atomic and verified.

A run folder keeps ``last.dcp/`` and the one before it, ``prev.dcp/``::

    last.dcp/
        __0_0.distcp, __1_0.distcp, ...   each rank's shards of the model and optimizer state (DCP)
        .metadata                         DCP's index of the shards (global shapes, which file holds what)
        train_state.pt                    step, scheduler, RNG states, counters, run config (``checkpoint.bundle``)
        manifest.json                     SHA-256 of every file above, written last

Every rank writes its shards into ``.partial-<step>.dcp/``; rank 0 then adds ``train_state.pt`` and the manifest
and renames the folder into place (``last.dcp -> prev.dcp``, partial -> ``last.dcp``), so a crash at any moment
leaves at least one complete checkpoint. ``read`` checks that every file of the manifest is present (a missing
shard is named) and matches its checksum; ``find_valid`` falls back from a bad ``last.dcp`` to ``prev.dcp``. DCP
reshards on load: a checkpoint of N ranks resumes on M ranks.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from train import checkpoint, torch_files
from train import run_dir as layout
from train.checkpoint import CheckpointError
from train.dcp_metadata import METADATA, MetadataError, SafeFileSystemReader, expected_sizes, read_metadata, shard_name

MANIFEST, TRAIN_STATE = "manifest.json", "train_state.pt"
MAX_TRAIN_STATE_BYTES = 64 * 2**20  # step, scheduler, RNG states, counters and the run config: far less in practice
PARTIAL_GLOB, TRASH_GLOB = ".partial-*.dcp", ".trash-*.dcp"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            sha.update(chunk)
    return sha.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_partial(run_dir: Path) -> None:
    """Remove the folders of interrupted saves and rotations (rank 0, holding the run folder's lock)."""
    for folder in [*run_dir.glob(PARTIAL_GLOB), *run_dir.glob(TRASH_GLOB)]:
        shutil.rmtree(folder, ignore_errors=True)


def _rotate(partial: Path, run_dir: Path) -> Path:
    """``last.dcp -> prev.dcp`` (dropping the old ``prev.dcp``), then ``partial -> last.dcp``."""
    last, prev = run_dir / layout.LAST_DCP, run_dir / layout.PREV_DCP
    if last.exists():
        if prev.exists():
            trash = prev.rename(run_dir / f".trash-{os.getpid()}.dcp")
            shutil.rmtree(trash)
        os.replace(last, prev)
    os.replace(partial, last)
    _fsync_dir(run_dir)
    return last


def save(
    run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, train_state: dict[str, Any]
) -> Path:
    """Collective: every rank writes its shards; rank 0 adds ``train_state`` (a ``checkpoint.bundle`` without
    model and optimizer) and the manifest, then moves the folder into place. Returns ``run_dir / last.dcp``."""
    partial = run_dir / f".partial-{train_state['step']}.dcp"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        with layout.writing(partial):
            try:
                dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=partial)
            except CheckpointException as err:  # an OSError inside (disk full) becomes WriteFailed naming the folder
                failure = _failure(err)
                raise layout.os_cause(failure) or _cut_short(partial, failure) from None
            if rank == 0:
                _finish(partial, train_state)
    except layout.WriteFailed:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if rank == 0:
        _rotate(partial, run_dir)
    dist.barrier()
    return run_dir / layout.LAST_DCP


def _failure(err: CheckpointException) -> BaseException:
    """The first rank's exception inside DCP's wrapper (which is a ``BaseException`` holding one per rank)."""
    return next(iter(err.failures.values()))[0] if err.failures else RuntimeError(str(err))


def _cut_short(partial: Path, failure: BaseException) -> BaseException:
    """The OS error behind a DCP write that torch's writer reports only as ``unexpected pos`` (its file came out
    shorter than written): the file size limit when a shard reached it, else a full disk. Other failures as they are."""
    if "unexpected pos" not in str(failure):
        return failure
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    sizes = [p.stat().st_size for p in partial.iterdir() if p.is_file()] if partial.is_dir() else []
    code = errno.EFBIG if limit != resource.RLIM_INFINITY and any(size >= limit for size in sizes) else errno.ENOSPC
    return OSError(code, os.strerror(code))


def _finish(partial: Path, train_state: dict[str, Any]) -> None:
    """Rank 0's part of a save: ``train_state.pt`` and the manifest (names, sizes and SHA-256 of every file)."""
    with open(partial / TRAIN_STATE, "wb") as f:
        torch.save(train_state, f)
        f.flush()
        os.fsync(f.fileno())
    files = {p.name: file_sha256(p) for p in sorted(partial.iterdir()) if p.is_file()}
    layout.write_json(partial / MANIFEST, {"step": train_state["step"], "files": files})
    _fsync_dir(partial)


def _checked_files(path: Path) -> dict[str, str]:
    """The manifest's ``{file name: SHA-256}`` after checking, before anything is hashed or unpickled, that every
    name is a plain file inside ``path`` (no symlink), that the DCP metadata is plain data, and that no file is
    larger than the checkpoint can hold (shards: the bytes their metadata spans; ``train_state.pt``: a bound)."""
    manifest = path / MANIFEST
    if manifest.is_symlink() or not manifest.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST} (its save was interrupted)")
    try:
        files = layout.read_json(manifest)["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise TypeError("'files' is not a mapping of file names to digests")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable: {err}") from err
    try:
        names = [shard_name(name, MANIFEST) for name in files]
    except MetadataError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from err
    if missing := [name for name in names if (path / name).is_symlink() or not (path / name).is_file()]:
        raise CheckpointError(f"checkpoint {path} is missing shard file(s) {', '.join(missing)}")
    if absent := [name for name in (METADATA, TRAIN_STATE) if name not in files]:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} does not list {', '.join(absent)}")
    try:
        sizes = expected_sizes(read_metadata(path))
    except MetadataError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from err
    sizes |= {METADATA: (path / METADATA).stat().st_size, TRAIN_STATE: MAX_TRAIN_STATE_BYTES}
    if unlisted := [name for name in sizes if name not in files]:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} does not list {', '.join(unlisted)}")
    for name in names:
        size = (path / name).stat().st_size
        if name not in sizes:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} lists {name}, which is not part of a checkpoint")
        if size > sizes[name] or (name not in (TRAIN_STATE, METADATA) and size != sizes[name]):
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} is {size} bytes, its metadata says {sizes[name]}"
            )
    return files


def read(path: Path) -> dict[str, Any]:
    """The ``train_state`` of a DCP checkpoint folder after checking it against its manifest; ``CheckpointError``
    naming the folder and the missing, oversized, foreign or corrupt files otherwise."""
    files = _checked_files(path)
    if bad := [name for name, digest in files.items() if file_sha256(path / name) != digest]:
        raise CheckpointError(f"checkpoint {path} is corrupt: {', '.join(bad)} do(es) not match {MANIFEST}")
    try:
        state = torch_files.load(path / TRAIN_STATE)
    except Exception as err:  # an unpickling error names the refused global; the file matched the manifest
        raise CheckpointError(f"checkpoint {path}: {TRAIN_STATE} is not plain data: {err}".splitlines()[0]) from err
    if not isinstance(state, dict) or state.get("checksum") != checkpoint.checksum(state):
        raise CheckpointError(f"checkpoint {path} is corrupt: {TRAIN_STATE} does not match its stored checksum")
    checkpoint.check_model_spec(path, state)
    return state


def find_valid(run_dir: Path, rank: int) -> tuple[Path, dict[str, Any]] | None:
    """Collective: the newest verified checkpoint folder and its ``train_state`` (None: there is none). Rank 0
    verifies (``checkpoint.find_valid`` with ``read``: a bad ``last.dcp`` is renamed ``last.dcp.corrupt`` and
    ``prev.dcp`` used, with a warning) and tells the other ranks; every rank raises the same error."""
    found: list[Any] = [None]
    if rank == 0:
        try:
            found[0] = checkpoint.find_valid(run_dir, names=(layout.LAST_DCP, layout.PREV_DCP), reader=read)
        except CheckpointError as err:
            found[0] = err
    dist.broadcast_object_list(found, src=0)
    if isinstance(found[0], CheckpointError):
        raise found[0]
    return found[0]


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: load the model and optimizer shards of ``path`` into a (sharded) ``model`` and ``optimizer``,
    resharding when the checkpoint was written by another number of ranks."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        dcp.load({"model": model_state, "optimizer": optimizer_state}, storage_reader=SafeFileSystemReader(path))
    except (Exception, CheckpointException) as err:  # DCP wraps every rank's reader error in one CheckpointException
        cause = _failure(err) if isinstance(err, CheckpointException) else err
        raise CheckpointError(f"checkpoint {path}: the model/optimizer shards do not fit this run: {cause}") from None
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def load_model(path: Path) -> nn.Module:
    """The unsharded model of a checkpoint folder (rebuilt from its stored spec), in eval mode; reads the shards of
    every rank in this process alone (no collectives)."""
    state = read(path)
    model = checkpoint.build_model(state["model_spec"])
    model_state = model.state_dict()
    try:
        dcp.load({"model": model_state}, storage_reader=SafeFileSystemReader(path), no_dist=True)
    except (Exception, CheckpointException) as err:  # DCP wraps reader errors in one CheckpointException
        cause = _failure(err) if isinstance(err, CheckpointException) else err
        raise CheckpointError(f"checkpoint {path}: its model shards cannot be read: {cause}") from None
    checkpoint.load_state_dict(path, model, model_state, "model")
    return model.eval()


def check_layout(run_dir: Path, fsdp: bool) -> None:
    """Refuse (before any data loads) to resume a single-file checkpoint with ``--fsdp`` or a DCP one without it,
    saying what to do instead."""
    has = {name: (run_dir / name).exists() for name in (layout.LAST, layout.PREV, layout.LAST_DCP, layout.PREV_DCP)}
    single, sharded = has[layout.LAST] or has[layout.PREV], has[layout.LAST_DCP] or has[layout.PREV_DCP]
    if fsdp and single and not sharded:
        raise CheckpointError(
            f"{run_dir} holds a single-process/DDP checkpoint ({layout.LAST}); resume it without --fsdp "
            "(torchrun works for DDP), or start the --fsdp run in a new --out folder"
        )
    if not fsdp and sharded and not single:
        raise CheckpointError(
            f"{run_dir} holds a sharded --fsdp checkpoint ({layout.LAST_DCP}/); resume it with --fsdp "
            "(on any number of ranks, also 1), or start a run without --fsdp in a new --out folder"
        )
