"""Vision towers behind one interface; `build_tower` picks the configured one."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from encoder_service.config import DEMO_HIDDEN_SIZE, EncoderConfig
from encoder_service.towers.base import Tower
from mmserve.wire.chunks import torch_dtype

# family -> module of its real tower (tower "torch"); each exposes
# `build(config) -> Tower` and `output_width(checkpoint_dir) -> int`.
TORCH_TOWERS: dict[str, str] = {
    "internvl2": "encoder_service.towers.internvit",
    "qwen-vl-chat": "encoder_service.towers.qwenvl",
    "llava-1.6": "encoder_service.towers.clip",
    "megrez-omni": "encoder_service.towers.siglip",
}


def _torch_tower_module(family: str) -> ModuleType:
    if family not in TORCH_TOWERS:
        raise ValueError(f"family {family!r} has no torch tower; families with one: "
                         f"{sorted(TORCH_TOWERS)}")
    return importlib.import_module(TORCH_TOWERS[family])


def checkpoint_hidden_size(family: str, checkpoint_dir: str) -> int:
    """Width of the rows the family's tower produces from this checkpoint (its LLM width)."""
    return _torch_tower_module(family).output_width(checkpoint_dir)


def build_tower(config: EncoderConfig) -> Tower:
    """Loads the configured tower (slow for real checkpoints: call it off the event loop).

    A configured hidden_size must equal the tower's output width (the LLM hidden size);
    for torch and TensorRT towers it is checked from the checkpoint's config before any
    weight is read.
    """
    if config.tower == "demo":
        from encoder_service.towers.demo import DemoTower  # builds its module at import

        return DemoTower(hidden_size=config.hidden_size or DEMO_HIDDEN_SIZE,
                         dtype=torch_dtype(config.dtype), seed=config.seed,
                         image_size=config.image_size)
    width = checkpoint_hidden_size(config.family, config.checkpoint_dir)
    if config.hidden_size is not None and config.hidden_size != width:
        raise ValueError(f"hidden_size {config.hidden_size} does not match the checkpoint's "
                         f"LLM hidden size {width} ({config.checkpoint})")
    if config.tower == "torch":
        tower: Tower = _torch_tower_module(config.family).build(config)
        return tower
    if config.tower == "tensorrt":
        from encoder_service.towers.tensorrt import TensorRTTower  # imports tensorrt

        device = config.device if config.device.startswith("cuda") else "cuda"
        assert config.tensorrt_engine is not None  # EncoderConfig requires it for tensorrt
        return TensorRTTower(Path(config.tensorrt_engine), torch_dtype(config.dtype),
                             config.image_size, device=device)
    raise ValueError(f"unknown tower {config.tower!r}")


__all__ = ["Tower", "build_tower", "checkpoint_hidden_size"]
