"""TrtllmEngine: the EngineClient contract over the TensorRT-LLM C++ executor.

The executor owns batching (in-flight), the paged KV cache and sampling. This class
turns EngineRequests into executor Requests, routes the executor's responses (read by
one pump thread) to per-request asyncio queues, and cancels what callers abandon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from llm_service.engine.errors import EngineDead, InvalidRequest, Overloaded, Unavailable
from llm_service.engine.protocol import (
    EngineClient,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
)
from llm_service.engine.trtllm.bindings import load_bindings
from llm_service.engine.trtllm.features import BindingFeatures
from llm_service.engine.trtllm.guided import guided_decoding_config
from llm_service.engine.trtllm.options import EngineLayout, TrtllmOptions
from llm_service.engine.trtllm.pump import ResponsePump
from llm_service.engine.trtllm.requests import build_request
from llm_service.engine.trtllm.stats import to_engine_stats
from llm_service.engine.trtllm.stream import RequestStream, finish_reason_map

log = logging.getLogger(__name__)


class TrtllmEngine(EngineClient):
    def __init__(self, options: TrtllmOptions, layout: EngineLayout, bindings: ModuleType) -> None:
        self._options = options
        self._layout = layout
        self._b = bindings
        self._finish = finish_reason_map(bindings)
        self._features = BindingFeatures.probe(bindings)
        # Prompt tables stay on the host; pinned (which needs CUDA) for the executor's DMA.
        self._pin_tables = torch.cuda.is_available()
        self._executor: Any = None  # the bindings' Executor once started
        self._pump: ResponsePump | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}
        self._by_executor_id: dict[int, RequestStream] = {}
        self._stats = EngineStats(block_size=layout.tokens_per_block)
        self._dead: str | None = None
        self._guided_off: str | None = "guided decoding is not set up yet"

    @classmethod
    def from_options(cls, model_dir: Path | str, options: dict[str, Any]) -> TrtllmEngine:
        """Builds the engine from the YAML `engine:` section (without `kind`).

        Raises ValueError with one line when an option is wrong, `tensorrt_llm` is not
        installed, or the engine directory is not a usable trtllm-build output.
        """
        bindings = load_bindings()
        opts = TrtllmOptions.from_dict(Path(model_dir), options)
        assert opts.engine_dir is not None  # from_dict defaults it to the model directory
        return cls(opts, EngineLayout.read(opts.engine_dir), bindings)

    @property
    def hidden_size(self) -> int:
        return self._layout.hidden_size

    @property
    def vocab_size(self) -> int:
        return self._layout.vocab_size

    @property
    def max_model_len(self) -> int:
        built = self._layout.max_seq_len
        return min(self._options.max_model_len or built, built)

    @property
    def max_num_seqs(self) -> int:
        return int(self._layout.max_batch_size)

    @property
    def healthy(self) -> bool:
        return self._dead is None

    def stats(self) -> EngineStats:
        return self._stats

    async def start(self) -> None:
        if self._executor is not None:
            return
        self._loop = asyncio.get_running_loop()
        engine_dir = self._options.engine_dir
        guided = await asyncio.to_thread(self._guided_decoding)
        try:
            self._executor = await asyncio.to_thread(
                lambda: self._b.Executor(model_path=engine_dir,
                                         model_type=self._b.ModelType.DECODER_ONLY,
                                         executor_config=self._executor_config(guided)))
        except RuntimeError as exc:  # C++ exceptions surface as RuntimeError
            raise ValueError(f"TensorRT-LLM could not load the engine in {engine_dir}: "
                             f"{_first_line(exc)}") from exc
        self._pump = ResponsePump(
            self._executor, timedelta(milliseconds=self._options.await_timeout_ms),
            self._options.stats_interval_s, on_responses=self._from_pump,
            on_stats=self._drain_stats, on_fatal=self._fatal_from_pump)
        self._pump.start()
        log.info("TensorRT-LLM engine %s (%s, vocab %d, hidden %d, max_seq_len %d, "
                 "prompt rows/request %d)", engine_dir, self._layout.architecture,
                 self.vocab_size, self.hidden_size, self.max_model_len,
                 self._layout.max_prompt_rows)

    def _guided_decoding(self) -> Any:
        """The executor's GuidedDecodingConfig, or None (and why, for structured requests)."""
        if not self._options.guided_decoding:
            self._guided_off = "the engine option guided_decoding is false"
            return None
        if not self._features.guided_decoding:
            self._guided_off = f"TensorRT-LLM {self._features.version} has no guided decoding"
            return None
        assert self._options.tokenizer_dir is not None  # from_dict defaults it
        config, self._guided_off = guided_decoding_config(self._b, self._options.tokenizer_dir)
        if config is None:
            log.warning("structured outputs are off: %s", self._guided_off)
        return config

    def _executor_config(self, guided_decoding_config: Any = None):
        b, o = self._b, self._options
        extra = {}
        if guided_decoding_config is not None:
            extra["guided_decoding_config"] = guided_decoding_config
        return b.ExecutorConfig(
            max_beam_width=1,
            scheduler_config=b.SchedulerConfig(
                capacity_scheduler_policy=getattr(b.CapacitySchedulerPolicy,
                                                  o.scheduler_policy.upper())),
            kv_cache_config=b.KvCacheConfig(
                enable_block_reuse=o.enable_block_reuse,
                max_tokens=o.kv_cache_max_tokens,
                free_gpu_memory_fraction=o.free_gpu_memory_fraction,
                host_cache_size=o.host_cache_size or None),
            # Set explicitly: the Python binding and the C++ header disagree on the default.
            enable_chunked_context=o.enable_chunked_context,
            iter_stats_max_iterations=o.iter_stats_max_iterations,
            batching_type=b.BatchingType.INFLIGHT,
            max_batch_size=o.max_batch_size,
            max_num_tokens=o.max_num_tokens,
            max_queue_size=o.max_queue_size,
            **extra,
        )

    async def shutdown(self) -> None:
        if self._executor is None:
            return
        for stream in list(self._streams.values()):
            self._cancel(stream)
        executor, self._executor = self._executor, None
        pump, timeout = self._pump, self._options.shutdown_timeout_s
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def close() -> None:
            try:
                if pump is not None:
                    pump.stop(timeout)
                executor.shutdown()
            except Exception:
                log.exception("TensorRT-LLM executor shutdown failed")
            finally:
                _call_soon(loop, _settle, done)

        # A daemon thread rather than to_thread: a hung shutdown must not block process exit.
        threading.Thread(target=close, name="trtllm-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done, timeout)
        except asyncio.TimeoutError:
            log.warning("TensorRT-LLM executor did not shut down within %.0f s", timeout)

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        stream = self._submit(request)
        try:
            while (output := await stream.queue.get()) is not None:
                yield output
        finally:
            if stream.open:  # the caller stopped early
                self._cancel(stream)

    async def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            self._cancel(stream)

    async def finish(self, request_id: str, index: int) -> None:
        # The executor cancels whole requests only: the choice's stream ends now, and its KV
        # blocks are freed with the request's, at once when it was the last open choice.
        stream = self._streams.get(request_id)
        if stream is not None and stream.finish(index):
            self._cancel(stream)

    def _submit(self, request: EngineRequest) -> RequestStream:
        if self._dead is not None:
            raise EngineDead(self._dead)
        if self._executor is None:
            raise Unavailable("the TensorRT-LLM engine is not running")
        if request.request_id in self._streams:
            raise InvalidRequest(f"request id {request.request_id!r} is already running")
        n, queue = request.sampling.n, self._options.max_queue_size
        if queue is not None and n > queue:
            # The executor queues each choice as a request of its own (child requests), so
            # such a request could never be admitted.
            raise InvalidRequest(f"n = {n} choices take {n} places in the engine queue, which "
                                 f"holds {queue}; ask for at most {queue}")
        trt_request, table, max_tokens = build_request(
            self._b, request, self._layout, self.max_model_len, self._options.streaming,
            self._options.pad_id, self._features, pin=self._pin_tables,
            guided_off=self._guided_off)
        try:
            executor_id = self._executor.enqueue_request(request=trt_request)
        except Exception as exc:
            message = _first_line(exc)
            if "queue size" in message:
                raise Overloaded(f"the engine queue is full; retry later ({message})") from None
            raise Unavailable(f"TensorRT-LLM rejected the request: {message}") from None
        stream = RequestStream(name=request.request_id, executor_id=executor_id,
                               prompt_len=len(request.prompt_token_ids), max_tokens=max_tokens,
                               n=request.sampling.n,
                               tokens_per_block=self._layout.tokens_per_block, table=table)
        self._streams[stream.name] = stream
        self._by_executor_id[executor_id] = stream
        return stream

    def _cancel(self, stream: RequestStream) -> None:
        self._end(stream, FinishReason.ABORT)
        if self._executor is None:
            return
        try:
            self._executor.cancel_request(id=stream.executor_id)
        except Exception as exc:
            log.warning("cancel_request(%d) failed: %s", stream.executor_id, _first_line(exc))

    def _end(self, stream: RequestStream, reason: FinishReason, error: str | None = None) -> None:
        """Finishes every open choice of `stream` and forgets it; late responses are dropped."""
        stream.close(reason, error)
        self._forget(stream)

    def _forget(self, stream: RequestStream) -> None:
        self._streams.pop(stream.name, None)
        self._by_executor_id.pop(stream.executor_id, None)

    # --- called from the pump thread: hand over to the event loop, nothing else ---

    def _from_pump(self, responses: list) -> None:
        _call_soon(self._loop, self._dispatch, responses)

    def _fatal_from_pump(self, message: str) -> None:
        _call_soon(self._loop, self._die, message)

    def _drain_stats(self, iterations: list) -> None:
        self._stats = to_engine_stats(iterations, self._layout.tokens_per_block, self._stats)

    # --- on the event loop ---

    def _die(self, message: str) -> None:
        self._dead = message
        for stream in list(self._streams.values()):
            self._end(stream, FinishReason.ABORT, error=message)

    def _dispatch(self, responses: list) -> None:
        for response in responses:
            stream = self._by_executor_id.get(response.request_id)
            if stream is None:
                continue
            if response.has_error():
                self._end(stream, FinishReason.ABORT, error=response.error_msg)
            elif stream.push(response.result, self._finish):  # every choice has finished
                self._forget(stream)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _call_soon(loop: asyncio.AbstractEventLoop | None, callback, *args) -> None:
    if loop is None or loop.is_closed():
        return
    with contextlib.suppress(RuntimeError):  # the loop closed in between
        loop.call_soon_threadsafe(callback, *args)
