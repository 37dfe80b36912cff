"""Imports the TensorRT-LLM executor bindings, or explains in one line what is missing.

The engine runs on TensorRT-LLM's C++ executor (`tensorrt_llm.bindings.executor.Executor`)
over an engine built with `trtllm-build`. The 1.2.x releases are the last line that has it:
upstream removed the TensorRT engine backend (the executor binding, `trtllm-build`, the
checkpoint converters) in mid-2026 and serves only its PyTorch backend since.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

log = logging.getLogger(__name__)

MODULE = "tensorrt_llm.bindings.executor"
SUPPORTED_LINE = "1.2"
SUPPORTED_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:1.2.1"

MISSING = ("engine 'trtllm' needs the tensorrt_llm package (NVIDIA TensorRT-LLM {line}.x), "
           "which is not importable here ({reason}); run the LLM service in the GPU image "
           "(deploy/docker/Dockerfile.gpu, FROM {image}) or use --engine torch")
NO_EXECUTOR = ("engine 'trtllm' needs TensorRT-LLM's C++ executor, which tensorrt_llm {version} "
               "does not have (the TensorRT engine backend ended with the {line}.x line); use "
               "TensorRT-LLM {line}.x ({image}, deploy/docker/Dockerfile.gpu) or --engine torch")


def load_bindings() -> ModuleType:
    """Returns `tensorrt_llm.bindings.executor`; ValueError with one clear line if it is absent
    or has no `Executor`.

    ValueError because the service's start-up code reports those as a single log line.
    """
    try:
        package = importlib.import_module("tensorrt_llm")
    except (ImportError, OSError) as exc:  # OSError: the package is there but its CUDA libs are not
        raise ValueError(MISSING.format(line=SUPPORTED_LINE, reason=_first_line(exc),
                                        image=SUPPORTED_IMAGE)) from None
    version = str(getattr(package, "__version__", "unknown"))
    try:
        module = importlib.import_module(MODULE)
    except ModuleNotFoundError:
        module = None
    except (ImportError, OSError) as exc:
        raise ValueError(MISSING.format(line=SUPPORTED_LINE, reason=_first_line(exc),
                                        image=SUPPORTED_IMAGE)) from None
    if module is None or not hasattr(module, "Executor"):
        raise ValueError(NO_EXECUTOR.format(version=version, line=SUPPORTED_LINE,
                                            image=SUPPORTED_IMAGE))
    if not version.startswith(SUPPORTED_LINE + "."):
        log.warning("TensorRT-LLM %s: mmserve's trtllm engine is tested with the %s.x line only",
                    version, SUPPORTED_LINE)
    return module


def binding_version(bindings: ModuleType) -> str:
    """The TensorRT-LLM version the bindings belong to, for messages."""
    package = importlib.import_module(bindings.__name__.split(".")[0])
    return str(getattr(package, "__version__", "unknown"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
