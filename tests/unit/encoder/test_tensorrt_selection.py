"""`tower: tensorrt` is configured like the torch tower plus an engine file, and builds TensorRTTower."""

from __future__ import annotations

import json

import pytest
import torch

from encoder_service import towers
from encoder_service.config import EncoderConfig


@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"llm_config": {"hidden_size": 896}}))
    return str(tmp_path)


def test_engine_file_is_required(checkpoint):
    with pytest.raises(ValueError, match="tower tensorrt needs tensorrt_engine"):
        EncoderConfig(tower="tensorrt", checkpoint=checkpoint)


def test_checkpoint_is_required(tmp_path):
    with pytest.raises(ValueError, match="tower tensorrt needs checkpoint"):
        EncoderConfig(tower="tensorrt", tensorrt_engine=str(tmp_path / "vision.plan"))


def test_hidden_size_comes_from_the_checkpoint(checkpoint, tmp_path):
    config = EncoderConfig(tower="tensorrt", checkpoint=checkpoint,
                           tensorrt_engine=str(tmp_path / "vision.plan"))
    assert config.hidden_size is None  # config holds values; the checkpoint is read at load
    assert towers.checkpoint_hidden_size(config.family, checkpoint) == 896
    with pytest.raises(ValueError, match="hidden_size 1024 does not match the checkpoint's LLM "
                                         "hidden size 896"):
        towers.build_tower(EncoderConfig(tower="tensorrt", checkpoint=checkpoint,
                                         tensorrt_engine=str(tmp_path / "vision.plan"),
                                         hidden_size=1024))


def test_build_tower_loads_the_engine(checkpoint, tmp_path, monkeypatch):
    made = {}

    class FakeTensorRTTower:
        def __init__(self, engine_path, dtype, image_size, device):
            made.update(engine_path=engine_path, dtype=dtype, image_size=image_size, device=device)

    from encoder_service.towers import tensorrt

    monkeypatch.setattr(tensorrt, "TensorRTTower", FakeTensorRTTower)
    config = EncoderConfig(tower="tensorrt", checkpoint=checkpoint, dtype="float16",
                           tensorrt_engine=str(tmp_path / "vision.plan"), device="cuda:1")
    assert isinstance(towers.build_tower(config), FakeTensorRTTower)
    assert made == {"engine_path": tmp_path / "vision.plan", "dtype": torch.float16,
                    "image_size": 448, "device": "cuda:1"}
