"""Fake TensorRT-LLM for CPU tests: only `tensorrt_llm.bindings.executor` exists."""

__version__ = "0.0.0+fake"
