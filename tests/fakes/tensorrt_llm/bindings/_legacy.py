"""The classes whose signatures differ in a binding before 0.16.

Modelled on the single-file pybind layout (cpp/tensorrt_llm/pybind/executor/bindings.cpp of
the 0.1x releases): no SamplingConfig.num_return_sequences or min_p, a five-argument
OutputConfig, four finish reasons, KvCacheConfig with seven arguments and block reuse off by
default, `Request(input_token_ids, *, max_tokens=None, max_new_tokens=None, ...)`, and a
Result without sequence fields.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3


class SamplingConfig:
    def __init__(self, beam_width=1, *, top_k=None, top_p=None, top_p_min=None,
                 top_p_reset_ids=None, top_p_decay=None, seed=None, random_seed=None,
                 temperature=None, min_tokens=None, min_length=None,
                 beam_search_diversity_rate=None, repetition_penalty=None,
                 presence_penalty=None, frequency_penalty=None, length_penalty=None,
                 early_stopping=None, no_repeat_ngram_size=None):
        args = dict(locals())
        args.pop("self")
        self.__dict__.update(args)


class OutputConfig:
    def __init__(self, return_log_probs=False, return_context_logits=False,
                 return_generation_logits=False, exclude_input_from_output=False,
                 return_encoder_output=False):
        args = dict(locals())
        args.pop("self")
        self.__dict__.update(args)


class KvCacheConfig:
    def __init__(self, enable_block_reuse=False, max_tokens=None, max_attention_window=None,
                 sink_token_length=None, free_gpu_memory_fraction=None, host_cache_size=None,
                 onboard_blocks=True):
        args = dict(locals())
        args.pop("self")
        self.__dict__.update(args)


def request_class(base):
    """The older Request: max_tokens keyword-only (or the deprecated max_new_tokens)."""

    class Request(base):
        def __init__(self, input_token_ids, *, max_tokens=None, max_new_tokens=None,
                     streaming=False, sampling_config=None, output_config=None, end_id=None,
                     pad_id=None, position_ids=None, bad_words=None, stop_words=None,
                     embedding_bias=None, external_draft_tokens_config=None,
                     prompt_tuning_config=None, lora_config=None, lookahead_config=None,
                     logits_post_processor_name=None, encoder_input_token_ids=None,
                     client_id=None, return_all_generated_tokens=False, priority=0.5, type=None,
                     context_phase_params=None, encoder_input_features=None,
                     encoder_output_length=None):
            tokens = max_tokens if max_tokens is not None else max_new_tokens
            if tokens is None:
                raise RuntimeError("missing required argument max_tokens")
            super().__init__(input_token_ids, tokens, streaming=streaming,
                             sampling_config=sampling_config or SamplingConfig(),
                             output_config=output_config or OutputConfig(), end_id=end_id,
                             pad_id=pad_id, bad_words=bad_words, stop_words=stop_words,
                             embedding_bias=embedding_bias,
                             prompt_tuning_config=prompt_tuning_config, client_id=client_id,
                             return_all_generated_tokens=return_all_generated_tokens,
                             priority=priority)

    return Request


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


@dataclass
class KvCacheStats:
    max_num_blocks: int = 0
    free_num_blocks: int = 0
    used_num_blocks: int = 0
    tokens_per_block: int = 0
    alloc_total_blocks: int = 0
    alloc_new_blocks: int = 0
    reused_blocks: int = 0
