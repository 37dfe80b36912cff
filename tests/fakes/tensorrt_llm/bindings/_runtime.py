"""The fake executor: a deterministic "model" advanced one iteration per await_responses call.

Behaviour copied from the real executor: request ids from enqueue_request, the queue-size
error text with each of a request's n choices taking a queue place (executorImpl.cpp
counts the child requests), prompt-table checks (promptTuningBuffers.cpp messages), the
extra-ids rule with block reuse on (LlmRequest::validate; 1.x only), streaming results that
carry only new tokens, END_ID not part of the output while stop words are, draining
iteration stats, KV block reuse keyed on (token id, extra id) of full blocks (reported per
request with return_perf_metrics), and a queue ordered by priority, first come first served
among equals (insertRequestInOrder in requestUtils.cpp).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from tensorrt_llm.bindings import executor as tle
from tensorrt_llm.bindings._flavour import LEGACY

instances: list[Executor] = []

# Older bindings have no CANCELLED; their cancelled requests end NOT_FINISHED.
CANCELLED = getattr(tle.FinishReason, "CANCELLED", tle.FinishReason.NOT_FINISHED)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class _Live:
    id: int
    request: tle.Request
    n: int
    source: list[int] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    reasons: list = field(default_factory=list)
    cancelled: bool = False
    error: str | None = None


class Executor:
    def __init__(self, model_path, model_type, executor_config):
        path = Path(model_path) / "config.json"
        if not path.is_file():
            raise RuntimeError(f"[TensorRT-LLM][ERROR] Failed to open {path}")
        config = json.loads(path.read_text())
        pretrained, build = config["pretrained_config"], config["build_config"]
        self.model_type, self.config = model_type, executor_config
        self.vocab_size = pretrained["vocab_size"]
        self.dtype = DTYPES[pretrained["dtype"]]
        self.max_input_len, self.max_seq_len = build["max_input_len"], build["max_seq_len"]
        self.max_batch_size = executor_config.max_batch_size or build["max_batch_size"]
        table_rows = build.get("max_prompt_embedding_table_size", 0)
        self.prompt_capacity = table_rows // build["max_batch_size"]
        self.tokens_per_block = build["plugin_config"]["tokens_per_block"]
        kv = executor_config.kv_cache_config
        self.max_blocks = (kv.max_tokens or 64 * self.tokens_per_block) // self.tokens_per_block
        self.requests: dict[int, tle.Request] = {}
        self.reused_by_request: dict[int, int] = {}
        self._cond = threading.Condition()
        self._queued: deque[_Live] = deque()
        self._active: dict[int, _Live] = {}
        self._stats: deque = deque(maxlen=executor_config.iter_stats_max_iterations)
        self._seen_blocks: set[int] = set()
        self._reused = self._missed = 0
        self._next_id, self._iter = 1, 0
        self._injected: str | None = None
        self._crashed: str | None = None
        self.is_shutdown = False
        self.step_time_s = 0.002
        instances.append(self)

    # --- the real API ---

    def enqueue_request(self, request):
        with self._cond:
            if self.is_shutdown:
                raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: Shutdown called")
            if getattr(request, "guided_decoding_params", None) is not None and \
                    self.config.guided_decoding_config is None:
                raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: Guided decoding is "
                                   "not enabled for this executor")
            bias = getattr(request, "embedding_bias", None)
            if bias is not None and tuple(bias.shape) != (self.vocab_size,):
                raise RuntimeError(f"[TensorRT-LLM][ERROR] embedding_bias must have shape "
                                   f"[{self.vocab_size}], got {list(bias.shape)}")
            n = getattr(request.sampling_config, "num_return_sequences", None) or 1
            limit = self.config.max_queue_size
            # The new request counts with its n - 1 children; queued ones count once each.
            if limit and limit > 0 and len(self._queued) + n > limit:
                raise RuntimeError(f"[TensorRT-LLM][ERROR] Maximum queue size of {limit} has "
                                   "been reached, please try again later")
            request_id, self._next_id = self._next_id, self._next_id + n
            live = _Live(request_id, request, n)
            later = [i for i, q in enumerate(self._queued)
                     if q.request.priority < request.priority]
            self._queued.insert(later[0] if later else len(self._queued), live)
            self.requests[request_id] = request
            self._cond.notify_all()
            return request_id

    def enqueue_requests(self, requests):
        return [self.enqueue_request(request) for request in requests]

    def cancel_request(self, id=None):
        with self._cond:
            for live in [*self._queued, *self._active.values()]:
                if live.id == id:
                    live.cancelled = True
            self._cond.notify_all()

    def await_responses(self, timeout=None):
        """One iteration; while idle, blocks up to `timeout` (a timedelta), forever without one."""
        if timeout is not None and not isinstance(timeout, timedelta):
            raise TypeError("await_responses(): timeout must be a datetime.timedelta")
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
        with self._cond:
            while not (self._queued or self._active or self._crashed or self.is_shutdown):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                self._cond.wait(remaining)
            if self._crashed:
                raise RuntimeError(self._crashed)
            responses = [] if self.is_shutdown else self._step()
        time.sleep(self.step_time_s)  # a GPU iteration takes time; callers may act in between
        return responses

    def get_num_responses_ready(self, id=None):
        return 0

    def get_latest_iteration_stats(self):
        with self._cond:
            drained = list(self._stats)
            self._stats.clear()
            return drained

    def get_latest_request_stats(self):
        return []

    def can_enqueue_requests(self):
        return True

    def shutdown(self):
        with self._cond:
            self.is_shutdown = True
            self._queued.clear()
            self._active.clear()
            self._cond.notify_all()

    # --- test hooks ---

    def inject_error(self, message: str) -> None:
        """Fails every running request with `message` on the next iteration."""
        with self._cond:
            self._injected = message

    def crash(self, message: str) -> None:
        """Makes await_responses raise from now on (the executor died)."""
        with self._cond:
            self._crashed = message
            self._cond.notify_all()

    def active_ids(self) -> list[int]:
        with self._cond:
            return sorted([live.id for live in self._queued] + list(self._active))

    # --- simulation ---

    def _step(self) -> list:
        self._iter += 1
        started, responses = time.monotonic(), []
        while self._queued and len(self._active) < self.max_batch_size:
            live = self._queued.popleft()
            live.error = self._admit(live)
            self._active[live.id] = live
        for live in list(self._active.values()):
            error = live.error or self._injected
            if error:
                responses.append(tle.Response(live.id, error))
            elif live.cancelled:
                responses += self._finish_all(live, CANCELLED)
            else:
                responses += self._advance(live)
            if error or all(r is not None for r in live.reasons):
                del self._active[live.id]
        self._injected = None
        self._record_stats(started, len(responses))
        return responses

    def _admit(self, live: _Live) -> str | None:
        request, ids = live.request, live.request.input_token_ids
        if len(ids) > self.max_input_len:
            return (f"Prompt length ({len(ids)}) exceeds maximum input length "
                    f"({self.max_input_len}).")
        if len(ids) + request.max_tokens > self.max_seq_len:
            return (f"Prompt length ({len(ids)}) + max tokens ({request.max_tokens}) exceeds "
                    f"maximum sequence length ({self.max_seq_len}).")
        tuning, extra = request.prompt_tuning_config, [0] * len(ids)
        table = None if tuning is None else tuning.embedding_table
        if table is not None:
            rows = table.shape[0]
            if rows > self.prompt_capacity:
                return (f"Prompt vocab size{rows} is larger than max prompt vocab size of "
                        f"{self.prompt_capacity}. Max prompt vocab size is computed from "
                        "max_prompt_embedding_table_size / max_batch_size.")
            if table.dtype != self.dtype:
                return "Request embedding table data type doesn't match model weight data type."
            reuse = self.config.kv_cache_config.enable_block_reuse
            if reuse and not LEGACY and tuning.input_token_extra_ids is None:
                return ("Input token extra ids must be provided when enabling kv cache reuse "
                        "with prompt table")
            if tuning.input_token_extra_ids is not None:
                extra = list(tuning.input_token_extra_ids)
                if len(extra) != len(ids):
                    return (f"inputTokenExtraIds vector size ({len(extra)}) must be the same as "
                            f"input token vector size ({len(ids)}).")
        fake = [t - self.vocab_size for t in ids if t >= self.vocab_size]
        if fake and (table is None or max(fake) >= table.shape[0]):
            return f"input token id {max(fake) + self.vocab_size} is outside the vocabulary"
        live.source = [t if t < self.vocab_size else self._row_token(table[t - self.vocab_size])
                       for t in ids]
        live.tokens, live.reasons = [[] for _ in range(live.n)], [None] * live.n
        if self.config.kv_cache_config.enable_block_reuse:
            self.reused_by_request[live.id] = self._match_blocks(list(zip(ids, extra)))
        return None

    def _row_token(self, row: torch.Tensor) -> int:
        return int(abs(float(row.float().sum())) * 1000) % self.vocab_size

    def _match_blocks(self, keys: list[tuple[int, int]]) -> int:
        size, chained, reused, matching = self.tokens_per_block, 0, 0, True
        for start in range(0, len(keys) - size + 1, size):
            chained = hash((chained, tuple(keys[start:start + size])))
            matching = matching and chained in self._seen_blocks
            reused += matching
            self._seen_blocks.add(chained)
        self._reused += reused
        self._missed += len(keys) // size - reused
        return reused

    def _advance(self, live: _Live) -> list:
        request, sampling, out = live.request, live.request.sampling_config, []
        stops = [list(word) for word in request.stop_words or []]
        for k in range(live.n):
            if live.reasons[k] is not None:
                continue
            tokens = live.tokens[k]
            token = (live.source[len(tokens) % len(live.source)] + k) % self.vocab_size
            new = []
            if token == request.end_id and len(tokens) >= (sampling.min_tokens or 1):
                live.reasons[k] = tle.FinishReason.END_ID
            else:
                tokens.append(token)
                new.append(token)
                if any(word and tokens[-len(word):] == word for word in stops):
                    live.reasons[k] = tle.FinishReason.STOP_WORDS
                elif len(tokens) >= request.max_tokens:
                    live.reasons[k] = tle.FinishReason.LENGTH
            out += self._results(live, k, new)
        return out

    def _finish_all(self, live: _Live, reason) -> list:
        out = []
        for k in range(live.n):
            if live.reasons[k] is None:
                live.reasons[k] = reason
                out += self._results(live, k, [])
        return out

    def _results(self, live: _Live, k: int, new: list[int]) -> list:
        request, reason = live.request, live.reasons[k]
        done = reason is not None
        if request.streaming:
            tokens = list(live.tokens[k]) if request.return_all_generated_tokens else new
        elif not done:
            return []
        else:
            exclude = request.output_config.exclude_input_from_output
            prefix = [] if exclude else request.input_token_ids
            tokens = [*prefix, *live.tokens[k]]
        result = tle.Result(
            is_final=all(r is not None for r in live.reasons),
            output_token_ids=[tokens],
            finish_reasons=[reason or tle.FinishReason.NOT_FINISHED])
        if not LEGACY:
            result.sequence_index, result.is_sequence_final = k, done
            result.decoding_iter = len(live.tokens[k])
        if getattr(request.output_config, "return_perf_metrics", False):
            reused = self.reused_by_request.get(live.id, 0)
            total = -(-len(request.input_token_ids) // self.tokens_per_block)
            result.request_perf_metrics = tle.RequestPerfMetrics(
                kv_cache_metrics=tle.KvCacheMetrics(
                    num_total_allocated_blocks=total, num_new_allocated_blocks=total - reused,
                    num_reused_blocks=reused,
                    num_missed_blocks=len(request.input_token_ids) // self.tokens_per_block
                    - reused))
        if request.output_config.return_log_probs:
            result.log_probs = [[-0.25] * len(live.tokens[k])]
        return [tle.Response(live.id, result)]

    def _record_stats(self, started: float, num_responses: int) -> None:
        size = self.tokens_per_block
        used = 0
        for live in self._active.values():
            length = len(live.request.input_token_ids) + max(map(len, live.tokens), default=0)
            used += -(-length // size)
        total = self._reused + self._missed
        kv = tle.KvCacheStats(
            max_num_blocks=self.max_blocks, free_num_blocks=self.max_blocks - used,
            used_num_blocks=used, tokens_per_block=size, alloc_total_blocks=total,
            alloc_new_blocks=self._missed, reused_blocks=self._reused)
        if not LEGACY:
            kv.missed_blocks = self._missed
            kv.cache_hit_rate = self._reused / total if total else 0.0
        self._stats.append(tle.IterationStats(
            iter=self._iter, iter_latency_ms=(time.monotonic() - started) * 1e3,
            num_active_requests=len(self._active), num_queued_requests=len(self._queued),
            max_num_active_requests=self.max_batch_size, kv_cache_stats=kv,
            inflight_batching_stats=tle.InflightBatchingStats(
                num_scheduled_requests=len(self._active))))
