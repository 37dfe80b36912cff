"""What this TensorRT-LLM executor binding accepts, probed once at start-up.

Bindings reject keyword arguments they do not know with TypeError, so each feature is probed
by constructing the config object that carries it. Requests that need a missing feature are
refused with InvalidRequest (a 400 naming the feature), never sent to fail inside the binding.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from llm_service.engine.trtllm.bindings import SUPPORTED_LINE, binding_version


@dataclass(frozen=True, slots=True)
class BindingFeatures:
    version: str
    num_return_sequences: bool  # SamplingConfig(num_return_sequences=): n > 1 (about 0.16 on)
    min_p: bool  # SamplingConfig(min_p=) (about 0.18 on)
    perf_metrics: bool  # OutputConfig(return_perf_metrics=): per-request KV reuse (0.17 on)
    guided_decoding: bool  # GuidedDecodingConfig/Params, Request(guided_decoding_params=)

    @classmethod
    def probe(cls, b: ModuleType) -> BindingFeatures:
        return cls(
            version=binding_version(b),
            num_return_sequences=_accepts(b.SamplingConfig, num_return_sequences=1),
            min_p=_accepts(b.SamplingConfig, min_p=0.0),
            perf_metrics=_accepts(b.OutputConfig, return_perf_metrics=True),
            guided_decoding=(hasattr(b, "GuidedDecodingConfig")
                             and hasattr(b, "GuidedDecodingParams")
                             and _accepts(b.Request, input_token_ids=[0], max_tokens=1,
                                          guided_decoding_params=None)),
        )

    def missing(self, what: str, fix: str) -> str:
        """The message for a request that needs a feature this binding lacks."""
        return (f"{what} is not available with TensorRT-LLM {self.version} (the supported line "
                f"is {SUPPORTED_LINE}.x); {fix}")


def _accepts(factory, **kwargs) -> bool:
    try:
        factory(**kwargs)
    except TypeError:
        return False
    return True
