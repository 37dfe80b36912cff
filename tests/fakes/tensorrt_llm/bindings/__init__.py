"""Fake `tensorrt_llm.bindings`."""
