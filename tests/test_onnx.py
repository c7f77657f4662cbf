"""ONNX export (``torch.onnx.export(..., dynamo=True)``) of ``models.ViT`` (unfrozen and frozen) and of an adapted timm
ViT, for every registered 2D encoding: onnxruntime's outputs equal eager ones to 1e-5."""

from __future__ import annotations

import pytest
import torch

import liere
from models import ViT

pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install -e '.[dev]')")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript (pip install -e '.[dev]')")
ort = pytest.importorskip("onnxruntime", reason="running the export needs onnxruntime (pip install -e '.[dev]')")

ENCODINGS_2D = [liere.encoding_info(name).example for name in liere.available() if 2 in liere.encoding_info(name).axes]
pytestmark = pytest.mark.slow


def onnx_outputs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Export ``model`` with the dynamo exporter and run it on ``images`` in onnxruntime."""
    program = torch.onnx.export(model, (images,), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])


def tiny_vit(spec: str) -> ViT:
    torch.manual_seed(0)
    return ViT((3, 16, 16), 10, 8, encoding=spec, dim=64, depth=2, heads=1).eval()


@pytest.mark.parametrize("frozen", [False, True], ids=["unfrozen", "frozen"])
@pytest.mark.parametrize("spec", ENCODINGS_2D)
def test_vit_exports_to_onnx_and_runs_as_eager(spec: str, frozen: bool, one_thread: None) -> None:
    model = tiny_vit(spec)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images)
    if frozen:
        model.freeze_rotations()
    torch.testing.assert_close(onnx_outputs(model, images), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", ENCODINGS_2D)
def test_adapted_timm_vit_exports_to_onnx_and_runs_as_eager(spec: str, one_thread: None) -> None:
    pytest.importorskip("timm", reason="the timm adapter needs timm")
    from liere.integrations.timm import liere_timm_vit

    torch.manual_seed(0)
    config = dict(img_size=32, patch_size=8, depth=2, num_classes=5)
    model = liere_timm_vit("vit_tiny_patch16_224", spec, create_kwargs=config).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(onnx_outputs(model, images), expected, atol=1e-5, rtol=0)
    if spec == "abs":  # the adapter keeps timm's own ViT with its learned table: nothing to freeze
        return
    model.freeze_rotations()
    torch.testing.assert_close(onnx_outputs(model, images), expected, atol=1e-5, rtol=0)
