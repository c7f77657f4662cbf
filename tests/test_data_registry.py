"""The data registry and its guarantees: bounded hub attempts, rebuilt corrupt caches, data identical to
earlier releases, no dataset named outside ``train/data/``, and the CONTRIBUTING example run as written."""

from __future__ import annotations

import ast
import hashlib
import http.server
import importlib.util
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from train import data
from train.ab import runner as ab
from train.data import austen, cache, fashion_mnist
from train.presets import PRESETS, preset_config
from train.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
SMOKE_ARROW = preset_config("smoke", "arrow").data_options  # 32 px, 4x4 grid, 256/128/128 images


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The real hub is never tried: tests point the hub at local servers explicitly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _sha(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- identical data across versions


def test_arrow_data_and_first_batch_are_pinned(tmp_path):
    """Checksums taken before the data layer became a package: same seeds, same tensors, same batch order."""
    task = load_task(preset_config("smoke", "arrow"), root=tmp_path)
    splits = task.splits
    assert _sha(splits.train.images, splits.train.labels) == "fe12d9b6466201db"
    assert _sha(splits.val.images, splits.val.labels) == "d240d6e4361ad4f3"
    assert _sha(splits.test.images, splits.test.labels) == "b5fed559fdd09cd0"
    assert _sha(splits.train.meta["cells"]) == "15e91234a0f1dee5"
    assert _sha(*next(task.batches(0))) == "c752d36161f33959"
    assert task.model_spec["kwargs"]["patch_size"] == 8  # one patch per 8 px cell


def test_arrow_canvas_test_set_is_pinned_and_described(tmp_path, capsys):
    """The extrapolation set is the old ``num_train=1, num_val=1`` test split, printed as what it is."""
    options = preset_config("cpu", "arrow").data_options  # 48 px, 6x6 cells of 8 px, 1000 test images
    test, info = data.extrapolation_set("arrow", options, 1.5, seed=0, root=tmp_path)
    assert _sha(test.images, test.labels) == "d9654c7917d6a9a0"
    assert info == {"kind": "canvas", "size": [72, 72], "grid": [9, 9], "rounded": False}
    out = capsys.readouterr().out
    assert "[data] arrow canvas 72 px, grid 9x9 (extrapolation test set, factor 1.5): 1000 images" in out
    assert "1/1/" not in out
    assert data.extrapolation_set("digits", {}, 1.5) is None
    assert data.extrapolation_titles() == {"canvas": "larger arrow canvas, same cell size"}


# ---------------------------------------------------------------- registry


def test_registry_entries_describe_themselves():
    for name, source in data.DATASETS.items():
        assert source.name == name and source.kind in ("image", "video", "text") and source.help
    assert [n for n, s in data.DATASETS.items() if s.kind == "text"] == ["austen", "shakespeare", "pydoc", "text"]
    assert data.is_text("text:/some/file.txt") and not data.is_text("folder:/some/dir")
    assert data.source("clips3d").kind == "video" and data.source("cifar100").offline == ""
    assert data.model_defaults("clips3d", {"size": 112}) == {"patch_size": (2, 16, 16)}
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; valid names: arrow"):
        preset_config("smoke", "imagenet")


def test_data_sizes_per_preset_live_with_the_dataset():
    for source in data.DATASETS.values():
        assert set(source.preset_options) <= set(PRESETS), source.name
    assert preset_config("cpu", "arrow").data_options == data.source("arrow").preset_options["cpu"]
    assert preset_config("smoke", "clips3d").data_options == {"frames": 4, "size": 16}
    assert preset_config("cpu", "pydoc").data_options == {}


def test_importing_the_data_package_imports_no_models_or_checkpoints():
    code = (
        "import sys, train.data; print(sorted(m for m in ('models', 'train.checkpoint', 'liere') if m in sys.modules))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert found.stdout.strip() == "[]"


def test_cli_help_lists_every_dataset():
    text = ab.parser().format_help()
    for name, source in data.DATASETS.items():
        assert (f"{name}:PATH" if source.takes_path else name) in text


def _string_constants(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_no_dataset_named_outside_the_data_package():
    """Dataset behaviour lives in its source: no string constant outside train/data/ is a dataset name."""
    names = set(data.DATASETS)
    found = [
        f"{path.relative_to(ROOT)}:{line}: {value!r}"
        for path in sorted((ROOT / "train").glob("*.py"))
        for line, value in _string_constants(path)
        if value in names or re.fullmatch(r"[\w-]+:\S*", value) and value.partition(":")[0] in names
    ]
    assert found == []


# ---------------------------------------------------------------- hub: every attempt bounded


@pytest.fixture
def silent_server() -> Iterator[str]:
    """An endpoint on 127.0.0.1 that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn in accepted:
        conn.close()


@pytest.fixture
def stalling_hub() -> Iterator[str]:
    """An endpoint that answers the dataset API page, then never answers a download request."""
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.startswith("/api/datasets/"):
                body = b'{"id": "uoft-cs/cifar10", "sha": "0000000000000000000000000000000000000000"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                release.wait(30)

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()
    server.server_close()


def test_silent_hub_costs_the_timeout_then_falls_back(tmp_path, monkeypatch, silent_server):
    monkeypatch.setattr(austen, "download_novels", lambda workdir: (_ for _ in ()).throw(OSError("no apt here")))
    hub = data.Hub(endpoint=silent_server, timeout=0.5)
    start = time.perf_counter()
    shakespeare = data.load_dataset("shakespeare", root=tmp_path, hub=hub)
    assert f"the Hugging Face hub at {silent_server} did not answer within 0.5 s" in shakespeare.source
    assert shakespeare.source.startswith("pydoc_data.topics")  # austen unavailable too, then pydoc
    with pytest.raises(data.DatasetUnavailable) as caught:
        data.load_dataset("cifar100", root=tmp_path, hub=hub)
    assert time.perf_counter() - start < 2.5
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"cifar100: the Hugging Face hub at {silent_server}")
    assert "`python -m train.data fetch cifar100`" in message and "offline alternatives: arrow" in message


def test_stalled_download_is_stopped_at_the_deadline(tmp_path, stalling_hub):
    hub = data.Hub(endpoint=stalling_hub, timeout=5, deadline=1.5)
    start = time.perf_counter()
    with pytest.raises(data.DatasetUnavailable, match=r"uoft-cs/cifar10 from .* took over 1.5 s"):
        data.load_dataset("cifar10", root=tmp_path, hub=hub)
    assert time.perf_counter() - start < 4
    assert not cache.cache_file(tmp_path, "cifar10").exists()


@pytest.mark.slow
def test_fetch_cli_gives_one_line_on_a_silent_hub(tmp_path, silent_server):
    env = {"HF_ENDPOINT": silent_server, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    command = [sys.executable, "-m", "train.data", "fetch", "cifar10", "--timeout", "0.5", "--root", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith(f"error: the Hugging Face hub at {silent_server} did not answer within 0.5 s")


def test_loaders_never_write_the_environment_or_install(tmp_path, monkeypatch, silent_server):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "absent")
    monkeypatch.setattr(subprocess, "run", None)  # a loader that shells out (apt-get) fails loudly
    before = dict(os.environ)
    with pytest.raises(data.DatasetUnavailable, match="`sudo apt-get install dataset-fashion-mnist`"):
        data.load_dataset("fashion-mnist", root=tmp_path, hub=data.Hub(endpoint=silent_server, timeout=0.3))
    assert dict(os.environ) == before


# ---------------------------------------------------------------- cache


def test_corrupt_cache_is_named_and_rebuilt(tmp_path, capsys):
    first = data.load_dataset("arrow", root=tmp_path, **SMOKE_ARROW)
    (path,) = tmp_path.glob("arrow_*.pt")
    path.write_bytes(path.read_bytes()[:1000])  # a torn write from another tool, or a disk error
    capsys.readouterr()
    again = data.load_dataset("arrow", root=tmp_path, **SMOKE_ARROW)
    err = capsys.readouterr().err
    assert f"[data] cache file {path} is unreadable" in err and "rebuilding it" in err
    assert torch.equal(again.train.images, first.train.images) and torch.equal(again.test.labels, first.test.labels)
    data.load_dataset("arrow", root=tmp_path, **SMOKE_ARROW)
    assert capsys.readouterr().err == ""  # the rebuilt file reads cleanly


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LIERE_DATA_DIR", str(tmp_path / "elsewhere"))
    assert data.default_root() == tmp_path / "elsewhere"
    data.load_dataset("arrow", **SMOKE_ARROW)
    assert len(list((tmp_path / "elsewhere").glob("arrow_*.pt"))) == 1


# ---------------------------------------------------------------- CONTRIBUTING's worked example


def test_contributing_example_adds_a_dataset(tmp_path, monkeypatch):
    """The "Adding a dataset" module of CONTRIBUTING.md, as written there, registered by its one line."""
    section = (ROOT / "CONTRIBUTING.md").read_text().split("## Adding a dataset", 1)[1].split("\n## ", 1)[0]
    module_code, registry = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    path = tmp_path / "spots.py"
    path.write_text(module_code)
    spec = importlib.util.spec_from_file_location("spots", path)
    spots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spots)
    assert "        spots.SOURCE,\n" in registry
    monkeypatch.setitem(data.DATASETS, spots.SOURCE.name, spots.SOURCE)

    task = load_task(preset_config("smoke", "spots", encoding="rope-mixed"), root=tmp_path)
    assert task.splits.image_shape == (1, 16, 16) and task.splits.num_classes == 3
    x, y = next(task.batches(0))
    logits = task.build_model()(x)
    assert logits.shape == (16, 3) and torch.isfinite(task.loss(logits, y))
    assert "spots" in ab.parser().format_help()
    labels = task.splits.train.labels
    assert torch.bincount(labels, minlength=3).min() > len(labels) / 6  # all three thirds occur
