"""The data layer: every offline source, the parsers behind them, seeding, caching and fallbacks."""

from __future__ import annotations

import gzip
import socket
import struct
import time
import zlib

import numpy as np
import pytest
import torch

from train import data
from train.data import (
    ImageSplits,
    TextSplits,
    arrow,
    austen,
    char_batches,
    clips3d,
    describe,
    fashion_mnist,
    load_dataset,
)
from train.data import text as text_source
from train.data.fashion_mnist import read_idx
from train.presets import preset_config

SMALL_ARROW = dict(image_size=48, grid=6, num_train=400, num_val=100, num_test=100)
SMALL_CLIPS = dict(frames=6, size=16, num_train=200, num_val=50, num_test=50)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the network: the hub is off unless a test says otherwise."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- arrow task


@pytest.mark.parametrize("size,grid", [(48, 6), (108, 9)])
def test_arrow_shapes_and_labels(tmp_path, size, grid):
    splits = load_dataset("arrow", root=tmp_path, image_size=size, grid=grid, num_train=300, num_val=20, num_test=30)
    assert isinstance(splits, ImageSplits)
    assert splits.source == f"generated:arrow(seed=0,image_size={size},grid={grid})"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (300, 20, 30)
    assert splits.num_classes == 8 and splits.image_shape == (1, size, size)
    x, y = splits.train[0]
    assert x.shape == (1, size, size) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert isinstance(y, int) and 0 <= y < 8


def test_arrow_label_is_the_arrow_under_the_y(tmp_path):
    train = load_dataset("arrow", root=tmp_path, **SMALL_ARROW).train
    cells = train.meta["cells"].numpy()
    n, grid, _ = cells.shape
    flat = cells.reshape(n, -1)
    is_arrow = (flat >= arrow.ARROW0) & (flat < arrow.LETTER0)
    assert (is_arrow.sum(1) == 8).all()
    for code in range(arrow.LETTER0, arrow.LETTER0 + len(arrow.LETTERS)):
        assert ((flat == code).sum(1) == 1).all()
    y_row, _ = divmod(np.argmax(flat == arrow.Y_CODE, axis=1), grid)
    assert (y_row < grid - 1).all()
    np.testing.assert_array_equal(arrow.label_from_cells(cells), train.labels.numpy())
    # the images are exactly the rendered layouts
    np.testing.assert_array_equal(arrow.render(cells, 48), train.images.numpy())
    # distractors: the answer is not the only (or the majority) arrow direction
    matching = ((flat - arrow.ARROW0) == train.labels.numpy()[:, None]).sum(1)
    assert matching.mean() < 3


def test_arrow_seeded_balanced_and_cached(tmp_path, monkeypatch):
    a = load_dataset("arrow", root=tmp_path / "a", seed=3, **SMALL_ARROW)
    b = load_dataset("arrow", root=tmp_path / "b", seed=3, **SMALL_ARROW)
    c = load_dataset("arrow", root=tmp_path / "a", seed=4, **SMALL_ARROW)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert not torch.equal(a.train.images[:100], a.val.images)
    counts = torch.bincount(a.train.labels, minlength=8)
    assert counts.min() > 0.5 * 400 / 8 and counts.max() < 1.5 * 400 / 8
    assert len(list((tmp_path / "a").glob("arrow_*seed=3*.pt"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("regenerated instead of reading the cache")

    monkeypatch.setattr(arrow, "generate", fail)
    again = load_dataset("arrow", root=tmp_path / "a", seed=3, **SMALL_ARROW)
    assert torch.equal(again.train.images, a.train.images) and again.source == a.source


def test_arrow_cpu_preset_size_and_grid_check(tmp_path):
    options = preset_config("cpu", "arrow").data_options | dict(num_train=10, num_val=2, num_test=2)
    assert load_dataset("arrow", root=tmp_path, **options).image_shape == (1, 48, 48)
    with pytest.raises(ValueError, match="too small"):
        arrow.generate(4, image_size=40, grid=3)


# ---------------------------------------------------------------- 3D clips


def test_clips3d_shapes_and_time_reversal(tmp_path):
    splits = load_dataset("clips3d", root=tmp_path, **SMALL_CLIPS)
    assert splits.image_shape == (1, 6, 16, 16) and splits.num_classes == 16
    x, y = splits.train[0]
    assert x.shape == (1, 6, 16, 16) and 0 <= y < 16
    train = splits.train
    meta = {k: v.numpy() for k, v in train.meta.items()}
    # reversing time = the same shape starting at the end and moving the opposite way
    end = meta["center"] + 5 * meta["velocity"]
    reversed_clips = clips3d.render(meta["shape"], end, -meta["velocity"], meta["radius"], 6, 16)
    mismatch = (reversed_clips != train.images.flip(2).numpy()).mean()
    assert mismatch < 1e-3
    reversed_labels = meta["shape"] * 4 + np.take(clips3d.OPPOSITE, meta["motion"])
    assert (reversed_labels != train.labels.numpy()).all()
    # motion is visible: first and last frames differ; each frame shows a shape
    assert (train.images[:, :, 0] != train.images[:, :, -1]).flatten(1).any(1).all()
    assert (train.images.flatten(3).amax(-1) > 0).all()


def test_clips3d_seeded(tmp_path):
    a = load_dataset("clips3d", root=tmp_path / "a", seed=1, **SMALL_CLIPS)
    b = load_dataset("clips3d", root=tmp_path / "b", seed=1, **SMALL_CLIPS)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.labels, b.val.labels)


# ---------------------------------------------------------------- Fashion-MNIST and IDX


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_idx_parser(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "images.idx.gz").write_bytes(gzip.compress(_idx_bytes(images, 0x08)))
    np.testing.assert_array_equal(read_idx(tmp_path / "images.idx.gz"), images)
    values = np.array([-5, 70000, 3], dtype=np.int32)
    (tmp_path / "values.idx").write_bytes(_idx_bytes(values, 0x0C))
    parsed = read_idx(tmp_path / "values.idx")
    np.testing.assert_array_equal(parsed, values)
    assert parsed.dtype == np.int32
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "bad.idx")


def test_fashion_mnist_from_idx_directory(tmp_path, monkeypatch):
    """The Debian path on a fake package directory of raw (uncompressed) IDX files."""
    fake = tmp_path / "fashion-mnist"
    fake.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        (fake / f"{prefix}-images-idx3-ubyte").write_bytes(_idx_bytes(rng.integers(0, 256, (n, 28, 28), np.uint8), 8))
        (fake / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(n, dtype=np.uint8) % 10, 8))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", fake)
    splits = load_dataset("fashion-mnist", root=tmp_path / "cache", val_size=5)
    assert splits.source == f"debian:{fake}"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (25, 5, 10)
    assert splits.image_shape == (1, 28, 28) and splits.num_classes == 10


def test_fashion_mnist_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(data.DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=tmp_path)


@pytest.mark.skipif(
    not fashion_mnist.DEBIAN_DIR.is_dir(),
    reason=f"{fashion_mnist.DEBIAN_DIR} absent: `apt-get install dataset-fashion-mnist` to test the real files",
)
def test_fashion_mnist_debian_package(tmp_path):
    start = time.perf_counter()
    splits = load_dataset("fashion-mnist", root=tmp_path, seed=0)
    assert time.perf_counter() - start < 10
    assert splits.source == "debian:/usr/share/datasets/fashion-mnist"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    x, y = splits.test[0]
    assert x.shape == (1, 28, 28) and 0 <= y < 10 and x.max() <= 1
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10


# ---------------------------------------------------------------- hub and offline behaviour


def test_hub_is_skipped_fast_when_offline(tmp_path):
    start = time.perf_counter()
    with pytest.raises(data.DatasetUnavailable, match="offline alternatives: arrow"):
        load_dataset("cifar10", root=tmp_path)
    with pytest.raises(data.DatasetUnavailable):
        load_dataset("cifar100", root=tmp_path, hub=data.Hub(online=False))
    assert time.perf_counter() - start < 3


def test_hub_probe_cannot_hang(tmp_path, monkeypatch):
    """A hub host that never answers (DNS or TCP) costs at most the hub timeout, then falls back."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(socket, "create_connection", _hang)
    monkeypatch.setattr(austen, "download_novels", _no_apt)
    start = time.perf_counter()
    shakespeare = load_dataset("shakespeare", root=tmp_path, hub=data.Hub.from_env(timeout=0.3))
    assert time.perf_counter() - start < 2
    assert "fallback: shakespeare unavailable" in shakespeare.source
    assert "https://hub.invalid did not answer within 0.3 s" in shakespeare.source


def _hang(*args, **kwargs):
    time.sleep(2)
    raise OSError("timed out")


# ---------------------------------------------------------------- R data and Austen


def _sexp(kind: int, attr: bool = False, tag: bool = False, levels: int = 0) -> bytes:
    return struct.pack(">i", kind | attr << 9 | tag << 10 | levels << 12)


def _charsxp(text: bytes | None, levels: int = 0) -> bytes:
    if text is None:
        return _sexp(9) + struct.pack(">i", -1)
    return _sexp(9, levels=levels) + struct.pack(">i", len(text)) + text


def _strsxp(*items: bytes) -> bytes:
    return _sexp(16) + struct.pack(">i", len(items)) + b"".join(items)


def _names_attr(names: list[str], first_use: bool) -> bytes:
    """Attribute pairlist names=...; the 'names' symbol is written once, then by reference."""
    symbol = _sexp(1) + _charsxp(b"names") if first_use else struct.pack(">i", 255 | 1 << 8)
    return _sexp(2, tag=True) + symbol + _strsxp(*(_charsxp(n.encode()) for n in names)) + _sexp(254)


def _serialized(body: bytes) -> bytes:
    return b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8" + body


def _named_list(items: dict[str, bytes], first_use: bool = True) -> bytes:
    body = _sexp(19, attr=True) + struct.pack(">i", len(items)) + b"".join(items.values())
    return body + _names_attr(list(items), first_use)


def test_r_unserializer_on_handcrafted_bytes():
    inner = _named_list({"k": _sexp(13) + struct.pack(">ii", 1, 7)})  # attributes follow items: first
    body = _named_list(
        {
            "s": _strsxp(_charsxp("caf\u00e9".encode()), _charsxp(None), _charsxp(b"\xe9", levels=1 << 2)),
            "i": _sexp(13) + struct.pack(">iiii", 3, 3, -(2**31), 42),
            "r": _sexp(14) + struct.pack(">idd", 2, 1.5, -2.0),
            "l": _sexp(10) + struct.pack(">iiii", 3, 1, 0, -(2**31)),
            "n": _sexp(254),
            "nested": inner,
        },
        first_use=False,
    )
    value = austen.unserialize(_serialized(body))
    assert value == {
        "s": ["caf\u00e9", None, "\u00e9"],
        "i": [3, None, 42],
        "r": [1.5, -2.0],
        "l": [True, False, None],
        "n": None,
        "nested": {"k": [7]},
    }
    with pytest.raises(ValueError, match="not an XDR"):
        austen.unserialize(b"A\n" + body)


def test_r_lazyload_db(tmp_path):
    payloads = [
        _serialized(_strsxp(*(_charsxp(line.encode()) for line in lines))) for lines in (["one", "two"], ["three"])
    ]
    blobs = [struct.pack(">i", len(p)) + zlib.compress(p) for p in payloads]
    offsets = [0, len(blobs[0])]
    (tmp_path / "Rdata.rdb").write_bytes(b"".join(blobs))
    variables = _named_list(
        {
            name: _sexp(13) + struct.pack(">iii", 2, off, len(blob))
            for name, off, blob in zip("ab", offsets, blobs, strict=True)
        }
    )
    index = _named_list(
        {"variables": variables, "references": _sexp(254), "compressed": _sexp(10) + struct.pack(">ii", 1, 1)},
        first_use=False,
    )
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_serialized(index)))
    assert austen.read_lazyload_db(tmp_path / "Rdata.rdx") == {"a": ["one", "two"], "b": ["three"]}


def _no_apt(workdir):
    raise OSError("apt-get download r-cran-janeaustenr: E: no apt here")


def test_austen_falls_back_to_pydoc(tmp_path, monkeypatch):
    monkeypatch.setattr(austen, "download_novels", _no_apt)
    splits = load_dataset("austen", root=tmp_path)
    assert splits.source.startswith("pydoc_data.topics (fallback: austen unavailable: apt-get download")
    assert len(splits.train) > 400_000


@pytest.fixture(scope="module")
def austen_splits(tmp_path_factory) -> TextSplits:
    splits = load_dataset("austen", root=tmp_path_factory.mktemp("austen"))
    if not splits.source.startswith("debian:"):
        pytest.skip(f"r-cran-janeaustenr could not be fetched with apt-get download: {splits.source}")
    return splits


def test_austen_debian_package(austen_splits):
    splits = austen_splits
    text = "".join(splits.vocab[i] for i in torch.cat([splits.train, splits.val, splits.test]).tolist())
    assert 3_900_000 < len(text) < 4_200_000
    assert text.startswith("SENSE AND SENSIBILITY") and "Elizabeth Bennet" in text
    assert len(splits.vocab) < 100 and len(splits.val) == len(splits.test) == int(len(text) * 0.05)


# ---------------------------------------------------------------- small sources


def _decode(splits: TextSplits) -> str:
    return "".join(splits.vocab[i] for i in torch.cat([splits.train, splits.val, splits.test]).tolist())


def test_pydoc_and_text_file(tmp_path):
    pydoc = load_dataset("pydoc", root=tmp_path)
    assert pydoc.source == "pydoc_data.topics" and _decode(pydoc) == text_source.pydoc_text()
    path = tmp_path / "corpus.txt"
    path.write_text("hello wörld\n" * 100, encoding="utf-8")
    text = load_dataset(f"text:{path}", root=tmp_path)
    assert text.source == f"text:{path}" and _decode(text) == path.read_text(encoding="utf-8")
    assert (len(text.train), len(text.val), len(text.test)) == (1080, 60, 60)
    assert text.vocab == sorted(set("hello wörld\n")) and text.train.dtype == torch.int64


def test_digits(tmp_path):
    splits = load_dataset("digits", root=tmp_path, seed=1)
    assert splits.source == "sklearn:load_digits" and splits.image_shape == (1, 8, 8)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    x, y = splits.val[0]
    assert x.shape == (1, 8, 8) and x.min() >= 0 and x.max() <= 1 and 0 <= y < 10
    again = load_dataset("digits", root=tmp_path, seed=1)
    assert torch.equal(again.test.labels, splits.test.labels)


def test_image_folder(tmp_path):
    from PIL import Image

    for label, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (20 + i, 30), color).save(tmp_path / "images" / label / f"{i}.png")
    splits = load_dataset(f"folder:{tmp_path / 'images'}", root=tmp_path, image_size=16)
    assert splits.source == f"folder:{tmp_path / 'images'}"
    assert splits.num_classes == 2 and splits.image_shape == (3, 16, 16)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 2, 2)
    x, y = splits.train[0]
    assert x.shape == (3, 16, 16)
    assert x[0 if y == 0 else 2].min() == 1  # cat red, dog blue


def test_unknown_names_and_options(tmp_path):
    with pytest.raises(ValueError, match="valid names: arrow"):
        load_dataset("imagenet", root=tmp_path)
    with pytest.raises(ValueError, match="folder:PATH"):
        load_dataset("folder", root=tmp_path)
    with pytest.raises(ValueError):
        load_dataset("arrow:extra", root=tmp_path)
    with pytest.raises(ValueError, match=r"dataset 'pydoc': unknown data options \['image_size'\]"):
        load_dataset("pydoc", root=tmp_path, image_size=3)


def test_char_batches_and_describe(tmp_path):
    splits = load_dataset("pydoc", root=tmp_path)
    x, y = char_batches(splits.train, context=32, batch_size=5, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = char_batches(splits.train, context=32, batch_size=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError):
        char_batches(splits.train[:10], context=10, batch_size=1)
    assert describe(splits).startswith("pydoc_data.topics: ") and "vocab 103" in describe(splits)
