"""Meta-device construction: every registered encoding and both models build under ``torch.device("meta")``
without allocating or drawing random numbers; after ``to_empty`` their ``reset_parameters()`` / ``init_weights()``
give bitwise the values of a normal construction under the same seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import liere
from models import CharLM, ViT
from tests.test_contract import CASES, DEPTH, DIM, HEAD_DIM, HEADS, SHAPES


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by name."""
    return dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))


def assert_bitwise_equal(got: nn.Module, want: nn.Module) -> None:
    got_tensors, want_tensors = tensors(got), tensors(want)
    assert got_tensors.keys() == want_tensors.keys()
    for name, value in want_tensors.items():
        assert got_tensors[name].device == value.device and got_tensors[name].dtype == value.dtype, name
        assert torch.equal(got_tensors[name], value), name


def on_meta(make, seed: int = 0) -> nn.Module:
    """``make()`` on meta (which must draw no random numbers), then ``to_empty`` on the CPU."""
    before = torch.get_rng_state()
    with torch.device("meta"):
        module = make()
    assert all(t.is_meta for t in tensors(module).values())
    assert torch.equal(torch.get_rng_state(), before), "meta construction drew random numbers"
    return module.to_empty(device="cpu")


def build(name: str, axes: int) -> liere.PositionEncoding:
    """The registry example of ``name`` at the contract tests' sizes."""
    kwargs = dict(head_dim=HEAD_DIM, num_axes=axes, num_heads=HEADS, depth=DEPTH, dim=DIM, grid_shape=SHAPES[axes])
    return liere.build(liere.encoding_info(name).example, **kwargs)


@pytest.mark.parametrize(("name", "axes"), CASES)
def test_encoding_built_on_meta_resets_to_a_normal_build(name: str, axes: int) -> None:
    pe = on_meta(lambda: build(name, axes))
    torch.manual_seed(0)
    pe.reset_parameters()
    torch.manual_seed(0)
    assert_bitwise_equal(pe, build(name, axes))


@pytest.mark.parametrize("spec", ["liere8:seed=5", "comrope-ld8:seed=5", "string-circulant:seed=5"])
def test_seeded_encoding_resets_to_its_own_seed_whatever_the_global_rng(spec: str) -> None:
    kwargs = dict(head_dim=16, num_axes=2, num_heads=2, depth=2)
    pe = on_meta(lambda: liere.build(spec, **kwargs))
    torch.manual_seed(123)
    pe.reset_parameters()
    assert_bitwise_equal(pe, liere.build(spec, **kwargs))


def test_reset_parameters_restores_a_trained_and_cast_encoding() -> None:
    torch.manual_seed(0)
    pe = liere.build("rope", head_dim=16, cache_len=8).to(torch.bfloat16)
    pe.freqs.mul_(2)
    pe.reset_parameters()
    assert pe.freqs.dtype == torch.float32  # an fp32 buffer stays fp32 through to(bfloat16)
    assert_bitwise_equal(pe, liere.build("rope", head_dim=16, cache_len=8))


def test_an_encoding_without_initial_state_says_what_is_missing() -> None:
    class Learned(liere.PositionEncoding):
        def __init__(self) -> None:
            super().__init__(head_dim=4, num_axes=1)
            self.freqs = nn.Parameter(torch.ones(2))

    with pytest.raises(NotImplementedError, match=r"Learned.initial_state\(\) does not give \['freqs'\]"):
        Learned().reset_parameters()


MODELS = {
    "vit-liere8": lambda: ViT((1, 8, 8), 5, 4, encoding="liere8", dim=32, depth=2, heads=2, num_registers=1),
    "vit-abs-mean-xavier": lambda: ViT(
        (1, 2, 8, 8), 5, (1, 4, 4), encoding="abs", dim=24, depth=1, heads=2, pool="mean", weight_init="xavier"
    ),
    "lm-tied-rope-mixed": lambda: CharLM(40, context=16, encoding="rope-mixed", dim=32, depth=2, heads=2),
    "lm-untied-comrope": lambda: CharLM(
        40, context=16, encoding="comrope-ld4", dim=32, depth=2, heads=2, tie_embeddings=False
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_model_built_on_meta_init_weights_equals_a_normal_build(name: str) -> None:
    model = on_meta(MODELS[name])
    torch.manual_seed(7)
    model.init_weights()
    torch.manual_seed(7)
    reference = MODELS[name]()
    assert_bitwise_equal(model, reference)
    if isinstance(model, CharLM) and model.tie_embeddings:
        assert model.head.weight is model.token_embed.weight


def test_init_weights_on_a_trained_model_restores_the_initial_weights() -> None:
    torch.manual_seed(3)
    model = MODELS["vit-liere8"]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.manual_seed(3)
    model.init_weights()
    torch.manual_seed(3)
    assert_bitwise_equal(model, MODELS["vit-liere8"]())


@pytest.mark.parametrize(("name", "axes"), CASES)
def test_derived_buffers_are_right_after_to_empty_without_init(name: str, axes: int) -> None:
    """A checkpoint holds no derived buffer (frequency tables...): made real by ``to_empty`` (here: filled with NaN,
    as garbage would be), they are computed at once, so loading weights without ``init_weights()`` is right."""
    torch.manual_seed(0)
    kwargs = dict(head_dim=HEAD_DIM, num_axes=axes, num_heads=HEADS, depth=DEPTH, dim=DIM, grid_shape=SHAPES[axes])
    spec = liere.encoding_info(name).example
    with torch.device("meta"):
        pe = liere.build(spec, **kwargs)
    pe._apply(lambda t: torch.full_like(t, float("nan") if t.is_floating_point() else -1, device="cpu"))
    normal = liere.build(spec, **kwargs)
    pe.load_state_dict(normal.state_dict())
    assert_bitwise_equal(pe, normal)


def test_reset_parameters_fills_sharded_parameters(tmp_path) -> None:
    """The FSDP2 recipe on a 1-rank group: parameters as ``DTensor`` shards; ``reset_parameters`` fills each shard."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        with torch.device("meta"):
            pe = liere.build("liere8", head_dim=16, num_axes=2, num_heads=2, depth=2)
        pe.to_empty(device="cpu")
        for name, param in list(pe.named_parameters()):
            sharded = distribute_tensor(torch.zeros_like(param), mesh, [Shard(0)])
            setattr(pe, name, nn.Parameter(sharded))
        torch.manual_seed(0)
        pe.reset_parameters()
        torch.manual_seed(0)
        normal = liere.build("liere8", head_dim=16, num_axes=2, num_heads=2, depth=2)
        assert torch.equal(pe.generators.full_tensor(), normal.generators)
    finally:
        dist.destroy_process_group()
