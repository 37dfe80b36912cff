"""EngineRequest -> `tensorrt_llm.bindings.executor.Request`.

Media embeddings travel as a per-request prompt table: the rows of all spans, in prompt
order, form one `[rows, hidden]` table in the engine dtype, and the prompt positions they
replace get the ids `vocab_size + i` for row i. The executor copies each request's table
into its own slice of the engine's table, so ids restart at `vocab_size` in every request.

Tables stay in host memory (pinned where CUDA is present): the executor copies them to the
GPU itself (`LlmRequest::movePromptEmbeddingTableToGpu`), and a CUDA tensor made here would
come from torch's caching allocator, outside the memory the executor sized its KV cache from.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from types import ModuleType

import torch

from llm_service.engine.errors import InvalidRequest
from llm_service.engine.protocol import EmbeddingSpan, EngineRequest, SamplingParams
from llm_service.engine.trtllm.features import BindingFeatures
from llm_service.engine.trtllm.guided import embedding_bias, guided_params
from llm_service.engine.trtllm.options import EngineLayout
from llm_service.engine.validation import Limits, validate_request


@dataclass(frozen=True, slots=True)
class PromptTable:
    input_token_ids: list[int]
    table: torch.Tensor | None  # [rows, hidden] in the engine dtype; None without media
    extra_ids: list[int] | None  # one per input token: 0 for text, the media id for slots


def media_extra_id(content_hash: str) -> int:
    """A non-zero uint64 per media item, stable across requests and processes.

    KV blocks are matched on (token id, extra id): the same image gets the same extra ids
    (its blocks are reused), different images never share blocks even at the same fake ids.
    """
    digest = hashlib.blake2b(content_hash.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") or 1


def build_prompt_table(prompt_token_ids: list[int], spans: tuple[EmbeddingSpan, ...],
                       layout: EngineLayout, pin: bool = False) -> PromptTable:
    """The request's ids with fake ids at the media slots (whose geometry validate_request
    checked), its host table and extra ids; refuses what the engine's prompt table cannot
    hold.

    pin: page-lock the table (needs CUDA), so the executor's copy to the GPU is a DMA.
    """
    if not spans:
        return PromptTable(list(prompt_token_ids), None, None)
    ordered = sorted(spans, key=lambda s: s.start)
    _check_capacity(ordered, layout)
    ids, extra_ids = list(prompt_token_ids), [0] * len(prompt_token_ids)
    row = 0
    for span in ordered:
        first = layout.vocab_size + row
        ids[span.start:span.end] = range(first, first + span.length)
        extra_ids[span.start:span.end] = [media_extra_id(span.content_hash)] * span.length
        row += span.length
    table = torch.cat([span.embeddings.to("cpu", layout.dtype) for span in ordered]).contiguous()
    return PromptTable(ids, table.pin_memory() if pin else table, extra_ids)


def _check_capacity(ordered: list[EmbeddingSpan], layout: EngineLayout) -> None:
    rows = sum(span.length for span in ordered)
    if layout.max_prompt_embedding_table_size == 0:
        raise InvalidRequest("this TensorRT-LLM engine was built without a prompt table and cannot "
                             "take images or audio; send text only")
    if rows > layout.max_prompt_rows:
        raise InvalidRequest(
            f"{len(ordered)} media item(s) need {rows} embedding rows; this engine takes at most "
            f"{layout.max_prompt_rows} per request (max_prompt_embedding_table_size "
            f"{layout.max_prompt_embedding_table_size} / max_batch_size {layout.max_batch_size}): "
            "send fewer or smaller images")


def sampling_config(b: ModuleType, sp: SamplingParams, features: BindingFeatures):
    """SamplingConfig with only the fields that differ from the runtime defaults.

    Unset fields stay None so older bindings (which lack e.g. min_p) still accept the call;
    a request that needs a field the binding lacks is an InvalidRequest.
    """
    kwargs: dict = {}
    if sp.greedy:
        kwargs["top_k"] = 1
    else:
        kwargs["temperature"] = sp.temperature
        if sp.top_k:
            kwargs["top_k"] = sp.top_k
        if sp.top_p < 1.0:
            kwargs["top_p"] = sp.top_p
        if sp.min_p > 0.0:
            if not features.min_p:
                raise InvalidRequest(features.missing("min_p", "send the request without min_p"))
            kwargs["min_p"] = sp.min_p
    if sp.seed is not None:
        kwargs["seed"] = sp.seed
    if sp.min_tokens > 1:
        kwargs["min_tokens"] = sp.min_tokens
    if sp.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = sp.repetition_penalty
    if sp.presence_penalty:
        kwargs["presence_penalty"] = sp.presence_penalty
    if sp.frequency_penalty:
        kwargs["frequency_penalty"] = sp.frequency_penalty
    if sp.n > 1:
        if not features.num_return_sequences:
            raise InvalidRequest(features.missing(f"n = {sp.n} (several choices per request)",
                                                  "send n = 1"))
        kwargs["num_return_sequences"] = sp.n
    return b.SamplingConfig(beam_width=1, **kwargs)


def _guided(b: ModuleType, sp: SamplingParams, features: BindingFeatures, guided_off: str | None):
    assert sp.structured is not None
    if not features.guided_decoding:
        raise InvalidRequest(features.missing("structured output (guided decoding)",
                                              "send the request without it"))
    if guided_off is not None:
        raise InvalidRequest(f"structured output is off on this TensorRT-LLM engine: "
                             f"{guided_off}; send the request without it")
    return guided_params(b, sp.structured)


def executor_priority(priority: int) -> float:
    """EngineRequest.priority (any int, higher first, 0 by default) -> the executor's
    priority in [0, 1] (higher first, 0.5 by default), order-preserving for |priority| < 100."""
    return 0.5 + 0.5 * math.tanh(priority / 32)


def build_request(b: ModuleType, request: EngineRequest, layout: EngineLayout, max_model_len: int,
                  streaming: bool, pad_id: int | None, features: BindingFeatures | None = None,
                  pin: bool = False, guided_off: str | None = "guided decoding is not set up"):
    """Validates the request against the engine limits; returns (executor Request, prompt table,
    max_tokens).

    guided_off: None when the executor was configured for guided decoding, else why not
    (a request with structured output is then refused with that reason).

    The prompt table (or None) must outlive the request: the executor copies it to the GPU
    asynchronously. max_tokens is returned because older bindings do not expose it on the
    Request. With `features.perf_metrics` the request asks for per-request KV metrics (the
    prompt tokens served from reused blocks).
    """
    features = features or BindingFeatures.probe(b)
    prompt_len = len(request.prompt_token_ids)
    validate_request(request, Limits(max_model_len, layout.vocab_size, layout.hidden_size,
                                     layout.max_batch_size, max_input_len=layout.max_input_len))
    if request.sampling.logprobs:
        raise InvalidRequest("top_logprobs is not available with the TensorRT-LLM engine, which "
                             "returns the log probability of each chosen token only; ask for "
                             "logprobs without top_logprobs")
    prompt = build_prompt_table(request.prompt_token_ids, request.spans, layout, pin)
    sp = request.sampling
    eos = request.eos_token_ids
    # end_id -1 never matches, which is how TensorRT-LLM ignores EOS; further EOS ids and
    # the caller's stop ids become single-token stop words.
    end_id = eos[0] if eos else -1
    stop_ids = list(dict.fromkeys((*eos[1:], *sp.stop_token_ids)))
    tuning = None
    if prompt.table is not None:
        tuning = b.PromptTuningConfig(embedding_table=prompt.table,
                                      input_token_extra_ids=prompt.extra_ids)
    max_tokens = min(sp.max_tokens, max_model_len - prompt_len)
    output = {"return_log_probs": sp.logprobs is not None, "exclude_input_from_output": True}
    if features.perf_metrics:
        output["return_perf_metrics"] = True
    kwargs = dict(
        input_token_ids=prompt.input_token_ids,
        max_tokens=max_tokens,
        streaming=streaming,
        sampling_config=sampling_config(b, sp, features),
        output_config=b.OutputConfig(**output),
        end_id=end_id,
        pad_id=pad_id if pad_id is not None else max(end_id, 0),
        stop_words=[[token] for token in stop_ids] or None,
        bad_words=None,
        prompt_tuning_config=tuning,
        embedding_bias=embedding_bias(sp.logit_bias, layout.vocab_size),
    )
    if sp.structured is not None:
        kwargs["guided_decoding_params"] = _guided(b, sp, features, guided_off)
    if not request.priority:  # bindings older than the priority argument take the rest
        return b.Request(**kwargs), prompt.table, max_tokens
    try:
        trt_request = b.Request(**kwargs, priority=executor_priority(request.priority))
        return trt_request, prompt.table, max_tokens
    except TypeError:
        raise InvalidRequest("this TensorRT-LLM version has no request priorities; send the "
                             "request without a priority") from None
