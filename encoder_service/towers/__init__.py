"""Vision towers behind one interface; `build_tower` picks the configured one."""

from __future__ import annotations

from encoder_service.config import EncoderConfig
from encoder_service.towers.base import Tower
from encoder_service.wire import torch_dtype


def build_tower(config: EncoderConfig) -> Tower:
    """Loads the configured tower (slow for real checkpoints: call it off the event loop)."""
    if config.tower == "demo":
        from encoder_service.towers.demo import DemoTower

        return DemoTower(hidden_size=config.hidden_size, dtype=torch_dtype(config.dtype),
                         seed=config.seed, image_size=config.image_size)
    raise ValueError(f"unknown tower {config.tower!r}")


__all__ = ["Tower", "build_tower"]
