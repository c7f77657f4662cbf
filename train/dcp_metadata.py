"""Reading a DCP checkpoint's ``.metadata`` without running code, and the shard files it may name.

``torch.distributed.checkpoint``'s ``FileSystemReader`` unpickles ``.metadata`` with plain ``pickle``, so a crafted
file runs any code on load. ``SafeFileSystemReader`` reads it with an unpickler that builds only the classes DCP
writes there (its metadata dataclasses, ``torch.Size``, dtypes, layouts, paths) and checks that every shard it
names is a plain file name inside the checkpoint folder. ``expected_sizes`` gives each shard's size from the
metadata, so a file larger than the checkpoint can hold is refused before it is hashed or read.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

METADATA = ".metadata"
MAX_METADATA_BYTES = 256 * 2**20  # DCP writes a few hundred bytes per tensor: ~10^6 tensors fit
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
ALLOWED_CLASSES = frozenset(
    {(_METADATA_MODULE, name) for name in (
        "BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex", "StorageMeta",
        "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING",
    )}
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "Path"),
        ("collections", "OrderedDict"),
    }
)  # fmt: skip


class MetadataError(ValueError):
    """A ``.metadata`` file that is not plain DCP metadata, or names files outside its folder."""


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only the classes of ``ALLOWED_CLASSES`` and torch dtypes; anything else is refused, never imported."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise MetadataError(f"{METADATA} refers to {module}.{name}, which DCP metadata never holds")


def shard_name(relative_path: Any, source: str = METADATA) -> str:
    """A file name that ``source`` (a checkpoint's index file) names, refusing all but a plain name in the folder."""
    name = str(relative_path)
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise MetadataError(f"{source} names {name!r}, which is not a file name inside the folder")
    return name


def read_metadata(folder: Path) -> Metadata:
    """The checked ``Metadata`` of a DCP checkpoint folder; ``MetadataError`` naming the problem otherwise."""
    path = Path(folder) / METADATA
    if path.is_symlink() or not path.is_file():
        raise MetadataError(f"{path} is missing or not a regular file")
    if (size := path.stat().st_size) > MAX_METADATA_BYTES:
        raise MetadataError(f"{path} is {size} bytes, more than DCP metadata can need ({MAX_METADATA_BYTES})")
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except MetadataError:
            raise
        except Exception as err:  # any malformed pickle: truncated, wrong opcodes, wrong arguments
            raise MetadataError(f"{path} is not readable DCP metadata: {err}") from err
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise MetadataError(f"{path} does not hold DCP metadata (got {type(metadata).__name__})")
    for info in metadata.storage_data.values():
        shard_name(getattr(info, "relative_path", None))
    return metadata


def expected_sizes(metadata: Metadata) -> dict[str, int]:
    """Per shard file named in ``metadata``, the number of bytes its entries span (``offset + length``)."""
    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = shard_name(info.relative_path)
        offset, length = int(info.offset), int(info.length)
        if offset < 0 or length < 0:
            raise MetadataError(f"{METADATA}: shard {name} has a negative offset or length")
        sizes[name] = max(sizes.get(name, 0), offset + length)
    return sizes


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata comes from ``read_metadata`` (no code runs, shards stay in the folder)."""

    def read_metadata(self) -> Metadata:  # no ``rank`` keyword: DCP then never falls back to per-rank metadata
        metadata = read_metadata(Path(self.path))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
