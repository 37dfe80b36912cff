"""The vision tower's ONNX export (the TensorRT build input) matches the torch tower on CPU."""

from __future__ import annotations

import pytest
import torch

from encoder_service.towers.demo import DemoTower
from encoder_service.towers.onnx_export import check_onnx, export_onnx, tower_module

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE = 224  # a smaller tile keeps the test fast; the export path is the same as at 448


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tower = DemoTower(hidden_size=32, dtype=torch.float32, seed=1, image_size=SIZE)
    path = export_onnx(tower_module(tower), tmp_path_factory.mktemp("onnx") / "vision.onnx",
                       image_size=SIZE)
    return tower, path


@pytest.mark.parametrize("tiles", [1, 5])
def test_onnx_matches_the_torch_tower_for_any_tile_count(exported, tiles):
    tower, path = exported
    assert check_onnx(tower_module(tower), path, tiles, image_size=SIZE) < 1e-3


def test_onnx_has_a_dynamic_tile_dimension(exported):
    import onnx

    _, path = exported
    model = onnx.load(str(path))
    (pixels,), (embeddings,) = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in pixels.type.tensor_type.shape.dim]
    assert dims == ["tiles", 3, SIZE, SIZE]
    out = [d.dim_param or d.dim_value for d in embeddings.type.tensor_type.shape.dim]
    assert out == ["tiles", (SIZE // 14) ** 2 // 4, 32]


def test_check_catches_a_different_tower(exported):
    _, path = exported
    other = DemoTower(hidden_size=32, dtype=torch.float32, seed=2, image_size=SIZE)
    with pytest.raises(ValueError, match="differs from the torch tower"):
        check_onnx(tower_module(other), path, 2, image_size=SIZE)


def test_a_tower_without_a_module_is_refused():
    with pytest.raises(ValueError, match="no torch module"):
        tower_module(object())
