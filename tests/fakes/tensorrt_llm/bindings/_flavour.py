"""Which binding the fake mirrors, from the fake package's version."""

from __future__ import annotations

import tensorrt_llm


def _version(text: str) -> tuple[int, int]:
    major, minor, *_ = text.split(".")
    return int(major), int(minor)


VERSION = tensorrt_llm.__version__
# Before 0.16: the single-file pybind layout (SamplingConfig without num_return_sequences and
# min_p, OutputConfig without return_perf_metrics, four finish reasons, block reuse off by
# default, no child requests, no extra-ids check).
LEGACY = _version(VERSION) < (0, 16)
# After 1.2: the TensorRT engine backend and with it the Executor binding are gone.
NO_EXECUTOR = _version(VERSION) > (1, 2)
