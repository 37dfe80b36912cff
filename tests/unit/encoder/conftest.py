"""Fixtures shared by the encoder unit tests."""

from __future__ import annotations

import pytest

from encoder_service.config import EncoderConfig


@pytest.fixture
def config() -> EncoderConfig:
    return EncoderConfig(port=0)
