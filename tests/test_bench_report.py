"""bench.report: BENCHMARKS.md is what the committed JSON renders to; every bench JSON records its run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

REPO = Path(__file__).resolve().parents[1]
META = dict(device="CPU (1 threads), torch 2.14.1", threads=1, torch="2.14.1", date="2026-12-03T09:00:00+00:00")


def test_benchmarks_md_is_rendered_from_the_committed_json() -> None:
    expected = report.render(REPO / "bench" / "results")
    assert (REPO / "BENCHMARKS.md").read_text() == expected, "run `python -m bench.report` and commit BENCHMARKS.md"
    assert len(expected.splitlines()) <= 480  # one page: the tables plus their commands and load flags


@pytest.mark.slow
def test_a_bench_command_records_itself_and_renders(tmp_path) -> None:
    path = tmp_path / "results" / "decode.json"
    path.parent.mkdir()
    argv = ["-m", "bench.decode", "--size", "tiny", "--repeats", "1", "--encodings", "rope", "--json", str(path)]
    done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    saved = json.loads(path.read_text())
    assert saved["command"] == " ".join(["python", *argv]) and saved["torch"].startswith("2.")
    assert saved["threads"] >= 1 and saved["date"].startswith("20") and len(saved["load_average"]) == 3
    text = report.render(tmp_path / "results")
    assert f"`OMP_NUM_THREADS={saved['threads']} python -m bench.decode --size tiny" in text
    assert "| encoding | cached tok/s | uncached tok/s | cached / uncached |" in text  # the harness's own columns
    assert "| rope |" in text


def test_unknown_harnesses_get_a_table_per_row_list_in_order(tmp_path) -> None:
    rows = [dict(model="tiny ViT", encoding=e, cache=c, ms=1.5, ratio=1.0) for e in ("rope", "liere8") for c in "ab"]
    (tmp_path / "infer.json").write_text(json.dumps(META | dict(command="python -m bench.infer", vit=rows, lm=[])))
    (tmp_path / "zeta.json").write_text(json.dumps(META | dict(command="python -m bench.zeta", rows=rows[:1])))
    text = report.render(tmp_path)
    assert text.index("## Inference with and without the rotation cache") < text.index("## zeta")
    assert text.count("| model | encoding | cache | ms | ratio |") == 2  # one table per list of rows
    assert "| tiny ViT | liere8 | b | 1.5 | 1 |" in text
    assert "CPU (1 threads), torch 2.14.1; 2026-12-03" in text


def test_json_without_run_metadata_is_named(tmp_path) -> None:
    (tmp_path / "ops.json").write_text(json.dumps(dict(device="CPU", exponential=[])))
    with pytest.raises(ValueError, match=r"ops.json: missing run metadata \['command', 'threads', 'torch', 'date'\]"):
        report.render(tmp_path)
    with pytest.raises(ValueError, match="holds no benchmark JSON"):
        report.render(tmp_path / "empty")


@pytest.mark.parametrize(("load", "flagged"), [(0.4, False), (2.4, True)])
def test_a_table_measured_under_load_is_flagged(tmp_path, load: float, flagged: bool) -> None:
    rows = [dict(model="ViT-S", encoding="liere64", compiled=c, fixed_ms=1.0, predicted_ratio=1.1) for c in (0, 1)]
    meta = META | dict(command="python -m bench.step --fit 2 4 8", load_average=[load, 1.0, 1.0], rows=rows)
    (tmp_path / "step-fit-vit.json").write_text(json.dumps(meta))
    text = report.render(tmp_path)
    assert (f"**Warning: measured under load (load average {load:.1f} >= 1)" in text) is flagged
    assert "| model | encoding | compiled | a (ms) |" in text  # the fit table says which rows are compiled
