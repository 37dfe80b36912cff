"""Model families the torch engine runs, by HF `model_type` (or `architectures`)."""

from __future__ import annotations

from llm_service.engine.models.llama import (
    INTERNLM2, LLAMA, MISTRAL, PHI3, QWEN, QWEN2, Family,
)

FAMILIES: dict[str, Family] = {
    f.model_type: f for f in (LLAMA, MISTRAL, QWEN2, PHI3, INTERNLM2, QWEN)}

__all__ = ["FAMILIES", "Family"]
