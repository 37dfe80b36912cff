"""Fixtures shared by the encoder unit tests."""

from __future__ import annotations

import pytest
import torch

from encoder_service.config import EncoderConfig
from encoder_service.encoder import Encoder
from encoder_service.families import build_preprocessor
from encoder_service.towers.demo import DemoTower


@pytest.fixture
def config() -> EncoderConfig:
    return EncoderConfig(port=0)


@pytest.fixture
async def encoder(config):
    """A started Encoder with the default config and the seeded demo tower."""
    encoder = Encoder(config, DemoTower(hidden_size=config.hidden_size, dtype=torch.float32,
                                        seed=0), build_preprocessor(config))
    encoder.start()
    yield encoder
    await encoder.stop()
