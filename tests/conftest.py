"""Shared fixtures: generated stubs, the embedded checkpoint, the gpu marker."""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("protos.llm_pb2") is None:
    pytest.exit("gRPC stubs are not generated: run `python protos/generate.py` "
                "(make test does this for you)", returncode=4)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2 checkpoint as a HF directory (converted once, then cached)."""
    from llm_service.weights import ensure_embedded_checkpoint

    return ensure_embedded_checkpoint()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from llm_service.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_dir)
