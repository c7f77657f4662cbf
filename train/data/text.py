"""Plain-text corpora, char-level: a local UTF-8 file (``text:PATH``) and Python's bundled help topics (``pydoc``)."""

from __future__ import annotations

from pathlib import Path

from train.data.source import Source
from train.data.splits import TEXT_FRACTIONS, TextSplits, text_splits


def pydoc_text() -> str:
    """Python's help topics (``pydoc_data.topics``) joined in sorted order (~465K chars)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_pydoc(root: Path, seed: int, *, fractions: tuple[float, float, float] = TEXT_FRACTIONS) -> TextSplits:
    """Python's bundled help topics: a tiny always-available corpus."""
    return text_splits(pydoc_text(), "pydoc_data.topics", fractions)


def load_file(
    root: Path, seed: int, *, path: str | Path, fractions: tuple[float, float, float] = TEXT_FRACTIONS
) -> TextSplits:
    """A local UTF-8 text file, char-level, split into contiguous parts."""
    return text_splits(Path(path).read_text(encoding="utf-8"), f"text:{path}", fractions)


PYDOC = Source("pydoc", "text", load_pydoc, "Python's bundled help topics, 0.47 M chars", offline="standard library")
FILE = Source("text", "text", load_file, "a local UTF-8 text file, char-level", offline="local file", takes_path=True)
