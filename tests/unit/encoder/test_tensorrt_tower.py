"""The TensorRT vision tower against the fake TensorRT 10 API in tests/fakes: a strongly typed
build whose precision is the ONNX export's, and a runtime that splits batches over the
profile's maximum and works on the caller's current CUDA stream.

What needs TensorRT and a GPU (the real build and numerics) is tests/gpu/test_tensorrt_tower_gpu.py.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from encoder_service.towers.demo import DemoTower
from encoder_service.towers.onnx_export import export_onnx, tower_module, typed_graph_dtypes

pytest.importorskip("onnx")
FAKES = Path(__file__).resolve().parents[2] / "fakes"
SIZE = 224


@pytest.fixture
def trt(monkeypatch):
    """The fake `tensorrt` for one test (a real one already imported is set aside)."""
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.syspath_prepend(str(FAKES))
    module = importlib.import_module("tensorrt")
    module.builders.clear()
    module.contexts.clear()
    yield module
    sys.modules.pop("tensorrt", None)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tower = DemoTower(hidden_size=32, dtype=torch.float32, seed=1, image_size=SIZE)
    root = tmp_path_factory.mktemp("vision")
    return {dtype: export_onnx(tower_module(tower), root / f"vision.{dtype}.onnx",
                               image_size=SIZE, dtype=dtype)
            for dtype in ("float32", "bfloat16")}


def test_the_typed_export_computes_in_its_dtype_from_float32_pixels(exports):
    assert typed_graph_dtypes(exports["bfloat16"]) == {
        "input": "float", "output": "bfloat16", "weights": "bfloat16"}
    assert typed_graph_dtypes(exports["float32"])["output"] == "float"


def build(trt, exports, tmp_path, dtype="bfloat16"):
    from encoder_service.towers.tensorrt import build_engine

    return build_engine(exports[dtype], tmp_path / "vision.plan", 1, 3, 6, image_size=SIZE,
                        workspace_gib=1)


def test_the_build_is_strongly_typed_and_sets_no_precision_flag(trt, exports, tmp_path):
    plan = build(trt, exports, tmp_path)
    (builder,) = trt.builders
    (network,), (config,) = builder.networks, builder.configs
    assert network.flags == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert config.flags == set() and config.pools == {trt.MemoryPoolType.WORKSPACE: 2**30}
    (profile,) = config.profiles
    tile = [3, SIZE, SIZE]
    assert profile.shapes == {"pixel_values": [[1, *tile], [3, *tile], [6, *tile]]}
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan.read_bytes())
    assert engine.get_tensor_dtype("embeddings") == trt.bfloat16  # the export's, not a flag's


def test_a_bad_profile_is_refused_before_tensorrt(trt, exports, tmp_path):
    from encoder_service.towers.tensorrt import build_engine

    with pytest.raises(ValueError, match="1 <= min_tiles <= opt_tiles <= max_tiles"):
        build_engine(exports["float32"], tmp_path / "x.plan", 4, 2, 6)


class Stream:
    cuda_stream = 0xBEEF


def test_the_tower_runs_chunks_on_the_current_stream(trt, exports, tmp_path, monkeypatch):
    from encoder_service.towers.tensorrt import TensorRTTower

    asked = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: asked.append(device)
                        or Stream())
    monkeypatch.setattr(torch.cuda, "Stream", None)  # a private stream would fail here
    tower = TensorRTTower(build(trt, exports, tmp_path), torch.float32, image_size=SIZE,
                          device="cpu")  # the fake engine reads and writes host memory
    assert (tower.tokens_per_tile, tower.hidden_size, tower.max_tiles) == (64, 32, 6)
    pixels = torch.randn(7, 3, SIZE, SIZE)
    rows = tower.encode(pixels)
    (context,) = trt.contexts
    assert context.streams == [0xBEEF, 0xBEEF]  # two runs (6 + 1 tiles), both on it
    assert asked == [torch.device("cpu")] and context.shapes["pixel_values"] == (1, 3, SIZE, SIZE)
    # each tile's rows come back in order, from the bf16 engine output, as float32 on the CPU
    expected = pixels.mean(dim=(1, 2, 3))[:, None, None] + torch.arange(64.0)[None, :, None]
    assert rows.dtype == torch.float32 and rows.device.type == "cpu"
    torch.testing.assert_close(rows, expected.expand(7, 64, 32).to(torch.bfloat16).float())


def test_a_file_that_is_no_engine_is_refused(trt, tmp_path):
    from encoder_service.towers.tensorrt import TensorRTTower

    (tmp_path / "vision.plan").write_bytes(b"not an engine")
    with pytest.raises(ValueError, match="is not a TensorRT engine"):
        TensorRTTower(tmp_path / "vision.plan", torch.float32, device="cpu")
