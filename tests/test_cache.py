"""The rotation cache (``liere.cache``): hits outside training, never stale, bounded, copy/thread/compile safe.

Every staleness test compares the cached encoding with a freshly built one holding the same weights: equal to the
bit. Hits and misses are counted on the encoding's own ``rotations`` method.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
from itertools import chain
from pathlib import Path

import pytest
import torch

from liere import Grid, PositionEncoding, Rotations, build, grid_coords
from liere.cache import MIN_TABLE, rotation_cache_disabled, set_rotation_cache

GRID = Grid((3, 4))
SPECS = ["liere8", "rope-mixed", "axial-rope", "comrope-ap4"]


def encoding(spec: str, num_axes: int = 2) -> PositionEncoding:
    torch.manual_seed(0)
    pe = build(spec, head_dim=16, num_axes=num_axes, num_heads=2, depth=2).eval()
    pe._test_spec = spec
    return pe


def build_like(pe: PositionEncoding) -> PositionEncoding:
    """A freshly built encoding (constructor, not a copy) of ``pe``'s spec with ``pe``'s weights, dtype and mode."""
    other = encoding(pe._test_spec, pe.num_axes).to(next(chain(pe.parameters(), pe.buffers())).dtype)
    other.load_state_dict(pe.state_dict())
    return other.train(pe.training)


def dense(pe: PositionEncoding, coords: object = GRID, num_prefix_tokens: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return pe(coords, num_prefix_tokens=num_prefix_tokens).to_dense()


def counting(pe: PositionEncoding) -> list[int]:
    """Count ``pe.rotations`` calls (cache misses) from now on."""
    calls, rotations = [], pe.rotations

    def counted(*args: object, **kwargs: object) -> Rotations:
        calls.append(1)
        return rotations(*args, **kwargs)

    pe.rotations = counted
    return calls


def assert_equal_to_fresh(pe: PositionEncoding, coords: object = GRID, num_prefix_tokens: int = 0) -> None:
    expected = dense(build_like(pe), coords, num_prefix_tokens)
    assert torch.equal(dense(pe, coords, num_prefix_tokens), expected)


# ----------------------------------------------------------------------------------- hits
@pytest.mark.parametrize("spec", SPECS)
def test_eval_no_grad_computes_once_and_equals_fresh(spec: str) -> None:
    pe = encoding(spec)
    calls = counting(pe)
    first, second = dense(pe, GRID, 1), dense(pe, Grid((3, 4)), 1)  # an equal Grid hits
    assert len(calls) == 1 and torch.equal(first, second)
    with torch.inference_mode():
        pe(GRID, num_prefix_tokens=1)  # inference tensors are kept apart from no_grad ones
    assert len(calls) == 2
    assert_equal_to_fresh(pe, GRID, 1)
    assert pe.cache_nbytes > 0 and f"cache={pe.cache_nbytes / 1e6:.3g}MB" in repr(pe)


def test_tensor_coords_hit_only_when_equal_and_nan_still_raises() -> None:
    pe = encoding("liere8")
    calls, coords = counting(pe), grid_coords(3, 4)
    dense(pe, coords)
    dense(pe, coords.clone())
    assert len(calls) == 1
    coords[5, 1] += 0.5  # changed in place: must miss
    assert torch.equal(dense(pe, coords), dense(build_like(pe), coords)) and len(calls) == 2
    coords[0, 0] = float("nan")
    for _ in range(2):
        with pytest.raises(ValueError, match="NaN or inf"), torch.no_grad():
            pe(coords)


def test_different_grid_or_prefix_tokens_miss() -> None:
    pe = encoding("liere8")
    calls = counting(pe)
    for coords, prefix in ((GRID, 0), (GRID, 1), (Grid((4, 3)), 1), (Grid((3, 4), spacing=0.5), 1)):
        assert_equal_to_fresh(pe, coords, prefix)
    assert len(calls) == 4


# ----------------------------------------------------------------------------------- never stale
def step(pe: PositionEncoding) -> None:
    optimizer = torch.optim.SGD(pe.parameters(), lr=0.1)
    pe.train()
    pe(GRID).to_dense()[..., 1, 0].sum().backward()  # the sines of the first pair: a gradient for every weight
    optimizer.step()
    pe.eval()


def replace_data(pe: PositionEncoding) -> None:
    for p in pe.parameters():
        p.data = p.data * 1.5


def load_other_weights(pe: PositionEncoding) -> None:
    pe.load_state_dict({k: v + 0.25 for k, v in pe.state_dict().items()})


def in_place_no_grad(pe: PositionEncoding) -> None:
    with torch.no_grad():
        for p in pe.parameters():
            p.mul_(-1)


CHANGES = {
    "optimizer-step": step,
    "p.data=": replace_data,
    "load_state_dict": load_other_weights,
    "in-place": in_place_no_grad,
    "to-float64": lambda pe: pe.to(torch.float64),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("spec", ["liere8", "rope-mixed"])
def test_any_weight_change_misses(spec: str, change: str) -> None:
    pe = encoding(spec)
    before = dense(pe)
    CHANGES[change](pe)
    after = dense(pe)
    assert not torch.equal(after, before.to(after.dtype))
    assert_equal_to_fresh(pe)


def test_writes_through_data_are_seen_after_clear_cache() -> None:
    """``p.data.copy_`` moves no version counter (autograd does not see it either): ``clear_cache()`` after it."""
    pe = encoding("liere8")
    dense(pe)
    for p in pe.parameters():
        p.data.copy_(p.data * 0.5)
    pe.clear_cache()
    assert_equal_to_fresh(pe)


def replace_with_plain_tensor(pe: PositionEncoding) -> None:
    weights = pe.generators.detach().clone()
    del pe.generators
    pe.generators = weights  # a plain tensor attribute in the parameter's place
    dense(pe)
    pe.generators.mul_(0.5)


def parametrize_then_change_its_tensor(pe: PositionEncoding) -> None:
    class Scale(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.factor = torch.tensor(1.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.factor

    torch.nn.utils.parametrize.register_parametrization(pe, "generators", Scale())
    dense(pe)  # cached with factor 1
    pe.parametrizations.generators[0].factor = torch.tensor(0.5)


def patch_rotations(pe: PositionEncoding) -> None:
    rotations = pe.rotations
    pe.rotations = lambda coords, **kwargs: rotations(coords * 2, **kwargs)


@pytest.mark.parametrize("change", [replace_with_plain_tensor, parametrize_then_change_its_tensor, patch_rotations])
def test_swapped_tensors_parametrizations_and_patched_methods_miss(change) -> None:
    pe = encoding("liere8")
    before = dense(pe)
    change(pe)
    fresh = encoding("liere8")
    change(fresh)
    fresh.clear_cache()
    after = dense(pe)
    assert not torch.equal(after, before) and torch.equal(after, dense(fresh))


@pytest.mark.parametrize("spec", ["rope", "axial-rope", "liere8"])
def test_coordinates_that_require_grad_get_their_gradient_every_call(spec: str) -> None:
    pe = encoding(spec, num_axes=1 if spec == "rope" else 2).requires_grad_(False)
    coords = grid_coords(*(GRID.shape[:1] if spec == "rope" else GRID.shape))
    q = torch.randn(2, 2, coords.shape[0], 16)
    grads = []
    for _ in range(2):
        x = coords.clone().requires_grad_()
        pe(x).for_layer(0).apply(q).sum().backward()  # the second call must not reuse the first call's graph
        grads.append(x.grad)
    assert grads[0] is not None and torch.equal(grads[0], grads[1])
    fresh = build_like(pe)
    x = coords.clone().requires_grad_()
    fresh.cache_size = 0
    fresh(x).for_layer(0).apply(q).sum().backward()
    assert torch.equal(grads[0], x.grad)


def test_buffer_change_and_train_eval_switch_miss() -> None:
    pe = encoding("axial-rope")
    calls = counting(pe)
    dense(pe)
    pe.freqs.mul_(2)  # a fixed frequency table (not in the state dict) changed in place
    fresh = build_like(pe)
    fresh.freqs.mul_(2)
    assert torch.equal(dense(pe), dense(fresh))
    pe.train()
    dense(pe)  # training mode under no_grad: cached, but not the eval entry
    pe.eval()
    dense(pe)
    assert len(calls) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_move_misses() -> None:
    pe = encoding("liere8")
    dense(pe)
    pe.cuda()
    assert dense(pe).device.type == "cuda"
    assert torch.equal(dense(pe).cpu(), dense(build_like(pe.cpu())))


def test_caller_cannot_corrupt_the_cache() -> None:
    pe = encoding("liere8")
    expected = dense(pe)
    with torch.no_grad():
        rot = pe(GRID)
        rot.blocks.mul_(2)  # in place on the returned tensors
        assert torch.equal(pe(GRID).to_dense(), expected)
        pe(GRID).blocks = None  # replacing an attribute of the returned object
        assert torch.equal(pe(GRID).to_dense(), expected)


# ----------------------------------------------------------------------------------- training
def test_training_with_grad_caches_nothing_and_gradients_match() -> None:
    pe = encoding("liere8")
    dense(pe)  # a cached eval entry
    pe.train()
    calls = counting(pe)
    losses = [pe(GRID).to_dense()[..., 1, 0].sum() for _ in range(2)]
    assert len(calls) == 2 and pe.cache_nbytes == 0  # recomputed every call; the eval entry freed
    (grad,) = torch.autograd.grad(losses[0], pe.generators)
    fresh = build_like(pe)
    (expected,) = torch.autograd.grad(fresh(GRID).to_dense()[..., 1, 0].sum(), fresh.generators)
    assert torch.equal(grad, expected)


def test_eval_with_grad_enabled_recomputes_trainable_rotations() -> None:
    """Eval mode alone does not cache a trainable encoding: its rotations carry the autograd graph."""
    pe = encoding("liere8")
    calls = counting(pe)
    for _ in range(2):
        pe(GRID).to_dense().sum().backward()
    assert len(calls) == 2 and pe.generators.grad is not None
    pe.requires_grad_(False)  # frozen: nothing to differentiate, cached
    pe(GRID)
    pe(GRID)
    assert len(calls) == 3


def test_inference_mode_entries_do_not_reach_autograd() -> None:
    pe = build("rope", head_dim=16).eval()  # no parameters: cached also with grad enabled
    with torch.inference_mode():
        pe(Grid((6,)))
    q = torch.randn(1, 1, 6, 16, requires_grad=True)
    pe(Grid((6,))).apply(q).sum().backward()  # inference tensors cannot be saved for backward: a separate entry
    assert q.grad is not None


# ----------------------------------------------------------------------------------- bounds and switches
def test_lru_size_off_switch_and_clear() -> None:
    pe = encoding("liere8")
    dense(pe)
    one = pe.cache_nbytes  # depth 2 x heads 2 x 12 positions x 2 blocks x 8 x 8 fp32
    assert one == 2 * 2 * 12 * 2 * 8 * 8 * 4
    for shape in ((4, 3), (2, 6)):
        dense(pe, Grid(shape))
    assert pe.cache_size == 2 and pe.cache_nbytes == 2 * one  # the oldest entry went
    pe.cache_size = 0
    assert pe.cache_nbytes == 0
    calls = counting(pe)
    dense(pe)
    dense(pe)
    assert len(calls) == 2 and pe.cache_nbytes == 0
    pe.cache_size = 2
    with rotation_cache_disabled():
        dense(pe)
    assert pe.cache_nbytes == 0 and len(calls) == 3
    previous = set_rotation_cache(False)
    assert previous is True and set_rotation_cache(previous) is False
    dense(pe)
    assert pe.cache_nbytes == one
    pe.clear_cache()
    assert pe.cache_nbytes == 0 and "cache=" not in repr(pe)
    with pytest.raises(ValueError, match="cache_size must be an int >= 0"):
        pe.cache_size = -1


def test_copies_start_empty_and_stay_independent(tmp_path) -> None:
    pe = encoding("liere8")
    expected = dense(pe)
    state_keys = set(pe.state_dict())
    ema = copy.deepcopy(pe)
    buffer = io.BytesIO()
    torch.save(pe, buffer)
    buffer.seek(0)
    copies = [ema, pickle.loads(pickle.dumps(pe)), torch.load(buffer, weights_only=False)]
    assert [c.cache_nbytes for c in copies] == [0, 0, 0] and set(pe.state_dict()) == state_keys
    with torch.no_grad():
        ema.generators.zero_()
    assert torch.equal(dense(pe), expected) and not torch.equal(dense(ema), expected)
    assert all(torch.equal(dense(c), expected) for c in copies[1:])


def test_threads_share_an_encoding(run_in_threads) -> None:
    pe = encoding("liere8")
    grids = [Grid((3, 4)), Grid((4, 3)), Grid((2, 5)), Grid((5, 2))]
    expected = {g: dense(build_like(pe), g) for g in grids}

    def run(grid: Grid) -> None:
        for _ in range(10):
            assert torch.equal(dense(pe, grid), expected[grid])

    assert run_in_threads(run, grids) == []


# ----------------------------------------------------------------------------------- compile and export
def test_compile_bypasses_the_cache() -> None:
    pe = encoding("liere8")
    q = torch.randn(2, 2, 12, 16)
    compiled = torch.compile(lambda q: pe(GRID).for_layer(1).apply(q), backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(q)
        assert pe.cache_nbytes == 0  # the compiled graph computes the rotations itself
        torch.testing.assert_close(out, pe(GRID).for_layer(1).apply(q), rtol=0, atol=1e-5)
        pe.generators.mul_(0.5)  # a weight change is seen by the compiled graph too
        torch.testing.assert_close(compiled(q), pe(GRID).for_layer(1).apply(q), rtol=0, atol=1e-5)


class Rotate(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pe = encoding("liere8")

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.pe(GRID, num_prefix_tokens=1).for_layer(0).apply(q)


def test_export_of_an_eval_model_recomputes_the_rotations() -> None:
    model, q = Rotate().eval(), torch.randn(2, 2, 13, 16)
    with torch.no_grad():
        expected = model(q)
        model.pe.clear_cache()
        exported = torch.export.export(model, (q,)).module()
        assert model.pe.cache_nbytes == 0  # tracing bypassed the cache
        torch.testing.assert_close(exported(q), expected, rtol=0, atol=1e-6)
        for module in (exported, model):  # the program computes the rotations from its generators: not constants
            module.get_parameter("pe.generators").mul_(0.5)
        torch.testing.assert_close(exported(q), model(q), rtol=0, atol=1e-6)
        assert not torch.allclose(model(q), expected)


# ----------------------------------------------------------------------------------- the 1D position table
def test_1d_positions_come_from_one_table() -> None:
    pe = encoding("liere8", num_axes=1)
    calls = counting(pe)
    full = dense(pe, Grid((40,)))
    steps = [dense(pe, Grid((1,), offset=float(i))) for i in range(40)]
    assert torch.equal(torch.cat(steps, dim=3), full)  # every decoding step is a row of the full forward's
    per_sample = dense(pe, torch.tensor([[3, 7, 39], [0, 1, 2]])[..., None])
    assert torch.equal(per_sample[:, 0], full[:, 0, :, [3, 7, 39]])
    assert torch.equal(per_sample[:, 1], full[:, 0, :, [0, 1, 2]])
    assert len(calls) == 1
    grown = dense(pe, Grid((100,)))  # the table grows: its earlier rows stay
    assert torch.equal(grown[:, :, :, :40], full) and len(calls) == 2
    fresh = build_like(pe)
    assert torch.equal(grown, dense(fresh, Grid((100,))))
    far = dense(pe, Grid((1,), offset=10.0 * MIN_TABLE))  # far past the table: computed directly
    assert torch.equal(far, dense(fresh, Grid((1,), offset=10.0 * MIN_TABLE)))


def test_integer_positions_in_training_equal_the_implicit_ones() -> None:
    pe = encoding("liere16", num_axes=1).train()
    implicit = pe(Grid((5,))).blocks
    given = pe(torch.arange(5).expand(3, 5)[..., None]).blocks  # x-transformers' pos: the same rows, shared
    assert torch.equal(given, implicit)
    given.sum().backward()
    assert pe.generators.grad.abs().sum() > 0


def test_docs_inference_examples_run() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "inference.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    onnx_blocks = [block for block in blocks if "import onnxruntime" in block]
    for block in blocks:
        if block not in onnx_blocks:
            exec(compile(block, "docs/inference.md", "exec"), {})
    assert onnx_blocks
    pytest.importorskip("onnxruntime", reason="the ONNX serving example needs pip install 'liere[onnx]'")
    pytest.importorskip("onnxscript", reason="the ONNX serving example needs pip install 'liere[onnx]'")
    for block in onnx_blocks:
        exec(compile(block, "docs/inference.md", "exec"), {})
