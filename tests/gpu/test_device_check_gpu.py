"""On a CUDA machine: the whole GPU check passes, and prompt tables are pinned host memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import device_check

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]


def test_the_device_check_passes():
    assert device_check.main(["--device", "cuda"]) == 0


def test_prompt_tables_are_pinned_host_tensors(tmp_path):
    from llm_service.engine.protocol import EmbeddingSpan
    from llm_service.engine.trtllm.options import EngineLayout

    layout = EngineLayout("LlamaForCausalLM", 1000, 16, torch.bfloat16, 4, 256, 320, 256, 32)
    span = EmbeddingSpan(1, torch.randn(5, 16, device="cuda"), "sha256:x")
    from llm_service.engine.trtllm.requests import build_prompt_table

    table = build_prompt_table([1, *[7] * 5, 2], (span,), layout, pin=True).table
    assert table.device.type == "cpu" and table.is_pinned() and table.dtype == torch.bfloat16
