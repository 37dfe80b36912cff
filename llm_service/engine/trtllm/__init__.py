"""The TensorRT-LLM engine: the C++ executor over a built engine, behind EngineClient.

Importing this package does not import `tensorrt_llm`; `TrtllmEngine.from_options` does,
and reports a missing installation in one line.
"""

from llm_service.engine.trtllm.engine import TrtllmEngine

__all__ = ["TrtllmEngine"]
