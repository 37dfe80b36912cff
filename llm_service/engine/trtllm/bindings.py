"""Imports the TensorRT-LLM executor bindings, or explains in one line what is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

MODULE = "tensorrt_llm.bindings.executor"

MISSING = ("engine 'trtllm' needs the tensorrt_llm package (NVIDIA TensorRT-LLM), which is not "
           "importable here ({reason}); run the LLM service in the GPU image "
           "(deploy/docker/Dockerfile.gpu, FROM nvcr.io/nvidia/tensorrt-llm/release) "
           "or use --engine torch")


def load_bindings() -> ModuleType:
    """Returns `tensorrt_llm.bindings.executor`; ValueError with one clear line if it is absent.

    ValueError because the service's start-up code reports those as a single log line.
    """
    try:
        return importlib.import_module(MODULE)
    except (ImportError, OSError) as exc:  # OSError: the package is there but its CUDA libs are not
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(MISSING.format(reason=reason)) from None
