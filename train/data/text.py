"""Plain-text corpora, char-level: a local UTF-8 file (``text:PATH``) and Python's bundled help topics (``pydoc``)."""

from __future__ import annotations

from pathlib import Path

from train.data.source import Source
from train.data.splits import TEXT_FRACTIONS, TextSplits, text_splits

MAX_BYTES = 256 * 2**20  # text:PATH reads at most this much (the char ids take 8 bytes per char in memory)


def pydoc_text() -> str:
    """Python's help topics (``pydoc_data.topics``) joined in sorted order (~465K chars)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_pydoc(root: Path, seed: int, *, fractions: tuple[float, float, float] = TEXT_FRACTIONS) -> TextSplits:
    """Python's bundled help topics: a tiny always-available corpus."""
    return text_splits(pydoc_text(), "pydoc_data.topics", fractions)


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of a regular file of at most ``MAX_BYTES``; ``ValueError`` naming the file otherwise (a folder,
    a device such as ``/dev/zero``, a pipe, too large, not UTF-8)."""
    path = Path(path)
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is a folder" if path.is_dir() else "is not a regular file"
        raise ValueError(f"text:PATH: {path} {what}; expected a UTF-8 text file")
    with open(path, "rb") as f:
        raw = f.read(MAX_BYTES + 1)  # bounded even where the size on disk says nothing (/proc)
    if len(raw) > MAX_BYTES:
        raise ValueError(f"text:PATH: {path} is larger than the {MAX_BYTES} bytes text:PATH reads")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"text:PATH: {path} is not UTF-8 text ({err})") from None


def load_file(
    root: Path, seed: int, *, path: str | Path, fractions: tuple[float, float, float] = TEXT_FRACTIONS
) -> TextSplits:
    """A local UTF-8 text file (at most ``MAX_BYTES``), char-level, split into contiguous parts."""
    return text_splits(read_text_file(path), f"text:{path}", fractions)


PYDOC = Source("pydoc", "text", load_pydoc, "Python's bundled help topics, 0.47 M chars", offline="standard library")
FILE = Source("text", "text", load_file, "a local UTF-8 text file, char-level", offline="local file", takes_path=True)
