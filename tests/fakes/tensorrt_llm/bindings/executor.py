"""Fake `tensorrt_llm.bindings.executor` with the real binding's names and keyword arguments.

Signatures follow TensorRT-LLM's pybind/nanobind executor bindings (request.cpp,
executorConfig.cpp, executor.cpp of the 1.x lines): `*` marks where the real binding is
keyword-only. The older flavour swaps in the classes of `_legacy.py`; the post-1.2 flavour
has no `Executor`. The simulated runtime lives in `_runtime.py`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ModelType(enum.Enum):
    DECODER_ONLY = 0
    ENCODER_ONLY = 1
    ENCODER_DECODER = 2


class BatchingType(enum.Enum):
    STATIC = 0
    INFLIGHT = 1


class CapacitySchedulerPolicy(enum.Enum):
    MAX_UTILIZATION = 0
    GUARANTEED_NO_EVICT = 1
    STATIC_BATCH = 2


class ContextChunkingPolicy(enum.Enum):
    FIRST_COME_FIRST_SERVED = 0
    EQUAL_PROGRESS = 1


class FinishReason(enum.Enum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


class SamplingConfig:
    def __init__(self, beam_width=1, *, top_k=None, top_p=None, top_p_min=None,
                 top_p_reset_ids=None, top_p_decay=None, seed=None, temperature=None,
                 min_tokens=None, beam_search_diversity_rate=None, repetition_penalty=None,
                 presence_penalty=None, frequency_penalty=None, prompt_ignore_length=None,
                 length_penalty=None, early_stopping=None, no_repeat_ngram_size=None,
                 num_return_sequences=None, min_p=None, beam_width_array=None):
        args = dict(locals())
        args.pop("self")
        self.__dict__.update(args)


class OutputConfig:
    def __init__(self, return_log_probs=False, return_context_logits=False,
                 return_generation_logits=False, exclude_input_from_output=False,
                 return_encoder_output=False, return_perf_metrics=False,
                 additional_model_outputs=None):
        args = dict(locals())
        args.pop("self")
        self.__dict__.update(args)


class PromptTuningConfig:
    def __init__(self, embedding_table, input_token_extra_ids=None):
        self._table = embedding_table
        self._extra = input_token_extra_ids

    embedding_table = property(lambda self: self._table)
    input_token_extra_ids = property(lambda self: self._extra)


class KvCacheConfig:
    def __init__(self, enable_block_reuse=True, max_tokens=None, max_attention_window=None,
                 sink_token_length=None, free_gpu_memory_fraction=None, host_cache_size=None,
                 onboard_blocks=True, cross_kv_cache_fraction=None,
                 secondary_offload_min_priority=None, event_buffer_max_size=0, *,
                 enable_partial_reuse=True, copy_on_partial_reuse=True, use_uvm=False,
                 attention_dp_events_gather_period_ms=5, runtime_defaults=None):
        args = dict(locals())
        args.pop("self")
        self.__dict__.update(args)


class SchedulerConfig:
    def __init__(self, capacity_scheduler_policy=CapacitySchedulerPolicy.GUARANTEED_NO_EVICT,
                 context_chunking_policy=None, dynamic_batch_config=None):
        self.capacity_scheduler_policy = capacity_scheduler_policy
        self.context_chunking_policy = context_chunking_policy
        self.dynamic_batch_config = dynamic_batch_config


class GuidedDecodingConfig:
    """executor.h: the backend and the tokenizer it compiles grammars against."""

    class GuidedDecodingBackend(enum.Enum):
        XGRAMMAR = 0
        LLGUIDANCE = 1

    def __init__(self, backend, encoded_vocab=None, tokenizer_str=None, stop_token_ids=None):
        if not isinstance(backend, GuidedDecodingConfig.GuidedDecodingBackend):
            raise TypeError("backend must be a GuidedDecodingConfig.GuidedDecodingBackend")
        self.backend, self.encoded_vocab = backend, encoded_vocab
        self.tokenizer_str, self.stop_token_ids = tokenizer_str, stop_token_ids


class GuidedDecodingParams:
    class GuideType(enum.Enum):
        JSON = 0
        JSON_SCHEMA = 1
        REGEX = 2
        EBNF_GRAMMAR = 3
        STRUCTURAL_TAG = 4

    def __init__(self, guide_type, guide=None):
        if not isinstance(guide_type, GuidedDecodingParams.GuideType):
            raise TypeError("guide_type must be a GuidedDecodingParams.GuideType")
        self.guide_type, self.guide = guide_type, guide


class ExecutorConfig:
    def __init__(self, max_beam_width=1, scheduler_config=None, kv_cache_config=None,
                 enable_chunked_context=False, normalize_log_probs=True,
                 iter_stats_max_iterations=1000, request_stats_max_iterations=0,
                 batching_type=BatchingType.INFLIGHT, max_batch_size=None, max_num_tokens=None,
                 parallel_config=None, peft_cache_config=None, logits_post_processor_config=None,
                 decoding_config=None, use_gpu_direct_storage=False, gpu_weights_percent=1.0,
                 max_queue_size=None, extended_runtime_perf_knob_config=None, debug_config=None,
                 recv_poll_period_ms=0, max_seq_idle_microseconds=180000000,
                 spec_dec_config=None, guided_decoding_config=None, additional_model_outputs=None,
                 cache_transceiver_config=None, gather_generation_logits=False,
                 mm_embedding_offloading=False, enable_trt_overlap=False,
                 fail_fast_on_attention_window_too_large=False):
        args = dict(locals())
        args.pop("self")
        self.__dict__.update(args)
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.kv_cache_config = kv_cache_config or KvCacheConfig()


class Request:
    BATCHED_POST_PROCESSOR_NAME = "batched"

    def __init__(self, input_token_ids, max_tokens, *, streaming=False, sampling_config=None,
                 output_config=None, end_id=None, pad_id=None, position_ids=None, bad_words=None,
                 stop_words=None, embedding_bias=None, external_draft_tokens_config=None,
                 prompt_tuning_config=None, multimodal_input=None, multimodal_embedding=None,
                 mrope_config=None, lora_config=None, lookahead_config=None,
                 kv_cache_retention_config=None, logits_post_processor_name=None,
                 logits_post_processor=None, encoder_input_token_ids=None, client_id=None,
                 return_all_generated_tokens=False, priority=0.5, type=None,
                 context_phase_params=None, encoder_input_features=None,
                 encoder_output_length=None, cross_attention_mask=None, num_return_sequences=1,
                 eagle_config=None, skip_cross_attn_blocks=None, guided_decoding_params=None,
                 language_adapter_uid=None, allotted_time_ms=None, cache_salt_id=None):
        ids = input_token_ids
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise TypeError("input_token_ids must be a list of int")
        self._input_token_ids = list(input_token_ids)
        self._max_tokens = int(max_tokens)
        self.streaming = streaming
        self.sampling_config = sampling_config or SamplingConfig()
        self.output_config = output_config or OutputConfig()
        self.end_id, self.pad_id = end_id, pad_id
        self.bad_words, self.stop_words = bad_words, stop_words
        self.embedding_bias = embedding_bias
        self.guided_decoding_params = guided_decoding_params
        self.prompt_tuning_config = prompt_tuning_config
        self.client_id = client_id
        self.return_all_generated_tokens = return_all_generated_tokens
        self.priority = priority
        self.allotted_time_ms = allotted_time_ms

    input_token_ids = property(lambda self: self._input_token_ids)
    max_tokens = property(lambda self: self._max_tokens)


@dataclass
class KvCacheMetrics:
    num_total_allocated_blocks: int = 0
    num_new_allocated_blocks: int = 0
    num_reused_blocks: int = 0
    num_missed_blocks: int = 0
    kv_cache_hit_rate: float = 0.0


@dataclass
class RequestPerfMetrics:
    timing_metrics: object = None
    kv_cache_metrics: KvCacheMetrics = field(default_factory=KvCacheMetrics)
    first_iter: int | None = None
    last_iter: int | None = None
    iter: int | None = None


@dataclass
class Result:
    is_final: bool = False
    output_token_ids: list = field(default_factory=list)
    cum_log_probs: list | None = None
    log_probs: list | None = None
    context_logits: object = None
    generation_logits: object = None
    encoder_output: object = None
    finish_reasons: list = field(default_factory=list)
    sequence_index: int = 0
    is_sequence_final: bool = False
    decoding_iter: int = 0
    request_perf_metrics: RequestPerfMetrics | None = None  # with return_perf_metrics


class Response:
    def __init__(self, request_id, error_msg_or_result, client_id=None):
        self.request_id, self.client_id = request_id, client_id
        self._payload = error_msg_or_result

    def has_error(self) -> bool:
        return isinstance(self._payload, str)

    @property
    def error_msg(self) -> str:
        if not self.has_error():
            raise RuntimeError("Cannot get the error message when hasError is false")
        return self._payload

    @property
    def result(self) -> Result:
        if self.has_error():
            raise RuntimeError("Cannot get the result for a response with an error "
                               f"({self._payload})")
        return self._payload


@dataclass
class KvCacheStats:
    max_num_blocks: int = 0
    free_num_blocks: int = 0
    used_num_blocks: int = 0
    tokens_per_block: int = 0
    alloc_total_blocks: int = 0
    alloc_new_blocks: int = 0
    reused_blocks: int = 0
    missed_blocks: int = 0
    cache_hit_rate: float = 0.0


@dataclass
class InflightBatchingStats:
    num_scheduled_requests: int = 0
    num_context_requests: int = 0
    num_gen_requests: int = 0
    num_paused_requests: int = 0
    num_ctx_tokens: int = 0
    micro_batch_id: int = 0
    avg_num_decoded_tokens_per_iter: float = 0.0


@dataclass
class IterationStats:
    timestamp: str = ""
    iter: int = 0
    iter_latency_ms: float = 0.0
    new_active_requests_queue_latency_ms: float = 0.0
    num_new_active_requests: int = 0
    num_active_requests: int = 0
    num_queued_requests: int = 0
    num_completed_requests: int = 0
    max_num_active_requests: int = 0
    gpu_mem_usage: int = 0
    cpu_mem_usage: int = 0
    pinned_mem_usage: int = 0
    kv_cache_stats: KvCacheStats | None = None
    static_batching_stats: object = None
    inflight_batching_stats: InflightBatchingStats | None = None


from tensorrt_llm.bindings._flavour import LEGACY, NO_EXECUTOR  # noqa: E402

if LEGACY:
    from tensorrt_llm.bindings import _legacy

    FinishReason, SamplingConfig, OutputConfig = (
        _legacy.FinishReason, _legacy.SamplingConfig, _legacy.OutputConfig)
    KvCacheConfig, Result, KvCacheStats = (
        _legacy.KvCacheConfig, _legacy.Result, _legacy.KvCacheStats)
    Request = _legacy.request_class(Request)
    del GuidedDecodingConfig, GuidedDecodingParams  # guided decoding came with 0.17

if not NO_EXECUTOR:
    from tensorrt_llm.bindings._runtime import Executor, instances

__all__ = [name for name in dir() if not name.startswith("_")]
