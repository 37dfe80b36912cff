"""The vision tower as a TensorRT engine matches the torch tower (needs tensorrt + a GPU)."""

from __future__ import annotations

import pytest
import torch

from encoder_service.towers.demo import DemoTower
from encoder_service.towers.onnx_export import export_onnx, tower_module

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]
pytest.importorskip("tensorrt")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_tensorrt_tower_matches_torch(tmp_path, dtype):
    from encoder_service.towers.tensorrt import TensorRTTower, build_engine

    tower = DemoTower(hidden_size=64, dtype=torch.float32, seed=0)
    onnx_path = export_onnx(tower_module(tower), tmp_path / "vision.onnx", dtype=dtype)
    plan = build_engine(onnx_path, tmp_path / "vision.plan", 1, 3, 6, workspace_gib=2)
    trt_tower = TensorRTTower(plan, dtype=torch.float32)
    # strongly typed: the engine keeps the export's types
    assert trt_tower._out_dtype == getattr(torch, dtype)
    assert (trt_tower.tokens_per_tile, trt_tower.hidden_size) == (256, 64)
    pixels = torch.randn(7, 3, 448, 448)  # more than max tiles: encoded in two runs
    got = trt_tower.encode(pixels)
    assert got.device.type == "cpu"
    expected = tower.encode(pixels)
    tolerance = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 1e-1}[dtype]
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
