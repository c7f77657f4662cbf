"""Every ``python`` code block of every ``docs/*.md`` page runs, offline.

A page's blocks run in order in one namespace (later blocks may use names from earlier ones), from the repository
root, with the Hugging Face hub offline. A block that is not meant to run (a fragment, or one that needs a
GPU or the network) is marked by an ``<!-- no-run -->`` line right above its opening fence; keep those few.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^(<!-- no-run -->\n)?```python\n(.*?)^```", re.S | re.M)
PAGES = sorted((ROOT / "docs").glob("*.md"))


def python_blocks(page: Path) -> list[tuple[bool, str]]:
    """``(runs, code)`` of each ``python`` block of ``page``, in order."""
    return [(not marker, code) for marker, code in BLOCK.findall(page.read_text())]


@pytest.mark.parametrize("page", [p for p in PAGES if any(runs for runs, _ in python_blocks(p))], ids=lambda p: p.name)
def test_docs_python_blocks_run(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process (torch and timm are imported once for the whole suite), in a namespace of its own."""
    code = "\n".join(block for runs, block in python_blocks(page) if runs)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    exec(compile(code, str(page), "exec"), {"__name__": f"docs.{page.stem}"})


def test_no_run_markers_sit_on_python_blocks_and_stay_few() -> None:
    for page in PAGES:
        text = page.read_text()
        markers = text.count("<!-- no-run -->")
        skipped = sum(not runs for runs, _ in python_blocks(page))
        assert markers == skipped, f"{page.name}: an <!-- no-run --> marker is not right above a ```python fence"
        assert skipped <= max(1, len(python_blocks(page)) // 3), f"{page.name}: most python blocks are marked no-run"
