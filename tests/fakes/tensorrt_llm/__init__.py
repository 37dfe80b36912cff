"""Fake TensorRT-LLM for CPU tests: only `tensorrt_llm.bindings.executor` exists.

`MMSERVE_FAKE_TRTLLM_VERSION` picks the binding flavour (read once, when this package is
imported): "1.2.1" (default, the supported line), "0.13.0" (an older binding without
n > 1, min_p, per-request perf metrics or the CANCELLED/TIMED_OUT finish reasons) or
"1.3.0" (after the TensorRT engine backend was removed: no `Executor`).
"""

import os

__version__ = os.environ.get("MMSERVE_FAKE_TRTLLM_VERSION", "1.2.1")
