"""Documents: every ``python`` block of every ``docs/*.md`` page runs, offline, and every relative link (and its
#anchor) in README.md and the other pages resolves.

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
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))


def python_blocks(page: Path) -> list[tuple[bool, str]]:
    """``(runs, code)`` of each ``python`` block of ``page``, in order."""
    return [(not marker, code) for marker, code in BLOCK.findall(page.read_text())]


RUNNABLE = [p for p in DOC_PAGES if any(runs for runs, _ in python_blocks(p))]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.name)
def test_docs_python_blocks_run(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process (torch and timm are imported once for the whole suite), in a namespace of its own."""
    code = "\n".join(block for runs, block in python_blocks(page) if runs)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    exec(compile(code, str(page), "exec"), {"__name__": f"docs.{page.stem}"})


def test_no_run_markers_sit_on_python_blocks_and_stay_few() -> None:
    for page in DOC_PAGES:
        text = page.read_text()
        markers = text.count("<!-- no-run -->")
        skipped = sum(not runs for runs, _ in python_blocks(page))
        assert markers == skipped, f"{page.name}: an <!-- no-run --> marker is not right above a ```python fence"
        assert skipped <= max(1, len(python_blocks(page)) // 3), f"{page.name}: most python blocks are marked no-run"


TOP_PAGES = ("README.md", "RESULTS.md", "BENCHMARKS.md", "CONTRIBUTING.md")
PAGES = sorted([*(ROOT / name for name in TOP_PAGES), *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code (they may hold brackets that are not links)."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", prose(page.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve()
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_link_checker_sees_links_and_anchors() -> None:
    readme = ROOT / "README.md"
    assert "docs/training.md" in relative_links(readme) and "results/default/final.png" in relative_links(readme)
    assert {"usage", "set-up-two-commands"} <= anchors(readme)
    assert len(readme.read_text().splitlines()) <= 200
