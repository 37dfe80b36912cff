"""Fixtures for the engine's unit tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import PreTrainedModel

from tiny_checkpoints import save_checkpoint


@dataclass(frozen=True)
class TinyModel:
    path: Path
    reference: PreTrainedModel  # transformers' model with the same weights


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> TinyModel:
    """A tiny Llama checkpoint shared by the engine tests (tied embeddings, like SmolLM2)."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    return TinyModel(directory, save_checkpoint(directory, "llama", seed=1))
