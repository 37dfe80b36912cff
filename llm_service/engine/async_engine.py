"""TorchEngine: the paged torch engine behind the async EngineClient interface.

The step loop (schedule -> execute -> update) runs in its own thread. Requests, aborts and
finished choices reach it as typed messages through a thread-safe inbox; each step's outputs
go back to the event loop in one call_soon_threadsafe and are routed to per-request asyncio
queues.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from llm_service.engine.block_manager import BlockManager
from llm_service.engine.config import EngineConfig
from llm_service.engine.errors import EngineDead, InvalidRequest, Overloaded
from llm_service.engine.inbox import Abort, Add, Failed, Finish, Message, Shutdown, StreamItem
from llm_service.engine.protocol import (
    EngineClient,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
)
from llm_service.engine.scheduler import Scheduler
from llm_service.engine.validation import Limits, validate_request

if TYPE_CHECKING:
    from llm_service.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_STEP_FAILURES = 3  # then the engine is considered broken, not the requests


def _settle(future: asyncio.Future, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


class TorchEngine(EngineClient):
    """Paged-KV, continuously batching engine for Llama-family checkpoints, on CPU or CUDA.

        engine = TorchEngine(EngineConfig(model_dir=path))
        await engine.start()  # loads the model off the event loop, then starts the step loop
        async for out in engine.generate(EngineRequest("id", token_ids, SamplingParams())):
            ...  # one EngineOutput per choice per step; out.index is the choice
        await engine.shutdown()

    Use it from the event loop that started it. `hidden_size`, `vocab_size` and
    `max_model_len` are known once start() returns (0 before).
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._runner: ModelRunner | None = None
        self._scheduler: Scheduler | None = None
        self._limits: Limits | None = None
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[StreamItem]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dead: str | None = None
        self._stats = EngineStats(block_size=config.block_size)
        self._step_ms = 0.0
        self._failures = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        ready = self._loop.create_future()
        # The model loads in the engine thread itself: every torch op then runs in that one
        # thread, so one OpenMP pool serves them (each extra pool makes all pools sleep
        # between parallel regions instead of spinning).
        self._thread = threading.Thread(target=self._run, args=(ready,), name="torch-engine",
                                        daemon=True)
        self._thread.start()
        try:
            await ready
        except Exception as exc:
            self._dead = f"the engine failed to start: {exc}"
            raise
        runner, cfg = self._runner, self.config
        assert runner is not None  # built by the engine thread before `ready`
        self._limits = Limits(runner.max_model_len, runner.spec.vocab_size,
                              runner.spec.hidden_size, cfg.max_num_seqs)
        log.info("torch engine started: %s on %s/%s, %d KV blocks of %d tokens, max_model_len %d",
                 runner.spec.family, runner.device, runner.dtype, runner.num_blocks,
                 cfg.block_size, self.max_model_len)

    @property
    def hidden_size(self) -> int:
        return self._limits.hidden_size if self._limits else 0

    @property
    def vocab_size(self) -> int:
        return self._limits.vocab_size if self._limits else 0

    @property
    def max_model_len(self) -> int:
        return self._limits.max_model_len if self._limits else 0

    def _build(self) -> None:
        from llm_service.engine.model_runner import ModelRunner  # torch loads with the model

        cfg = self.config
        runner = ModelRunner(cfg)
        self._scheduler = Scheduler(
            BlockManager(runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching),
            max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=runner.max_model_len, max_waiting=cfg.max_waiting,
            scheduling=cfg.scheduling)
        self._runner = runner
        self._publish_stats()

    async def shutdown(self) -> None:
        if self._thread is None:
            return
        self._inbox.put(Shutdown())
        await asyncio.to_thread(self._thread.join)
        self._dead = self._dead or "the engine is shut down"
        self._fail_all(self._dead)

    def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        return self._generate(request)

    async def abort(self, request_id: str) -> None:
        self._inbox.put(Abort(request_id))

    async def finish(self, request_id: str, index: int) -> None:
        self._inbox.put(Finish(request_id, index))

    def stats(self) -> EngineStats:
        return replace(self._stats)

    @property
    def healthy(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    async def _generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        if self._dead is not None or self._limits is None:
            raise EngineDead(self._dead or "the engine is not started")
        validate_request(request, self._limits)
        rid = request.request_id
        if rid in self._streams:
            raise InvalidRequest(f"request id {rid!r} is already in use")
        stream: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._streams[rid] = stream
        self._inbox.put(Add(request))
        unfinished = set(range(request.sampling.n))
        try:
            while unfinished:
                item = await stream.get()
                if isinstance(item, Exception):
                    unfinished.clear()
                    raise item
                if isinstance(item, Failed):
                    outputs = [EngineOutput(rid, i, [], FinishReason.ABORT, error=item.message)
                               for i in sorted(unfinished)]
                else:
                    outputs = item
                for out in outputs:
                    if out.finished:
                        unfinished.discard(out.index)
                    yield out
        finally:
            if self._streams.get(rid) is stream:
                del self._streams[rid]
            if unfinished:  # the caller stopped listening: free what the request holds
                self._inbox.put(Abort(rid))

    # What start() set up; the engine thread uses these only after it did.

    @property
    def _sched(self) -> Scheduler:
        assert self._scheduler is not None, "the engine is not started"
        return self._scheduler

    @property
    def _model_runner(self) -> ModelRunner:
        assert self._runner is not None, "the engine is not started"
        return self._runner

    @property
    def _event_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the engine is not started"
        return self._loop

    # --- event-loop side of the hand-over -------------------------------------------------

    def _deliver(self, items: Mapping[str, StreamItem]) -> None:
        for rid, item in items.items():
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put_nowait(item)

    def _fail_all(self, message: str) -> None:
        for stream in self._streams.values():
            stream.put_nowait(Failed(message))

    def _send(self, outputs: list[EngineOutput]) -> None:
        if not outputs:
            return
        self._publish_stats()  # whoever sees these outputs sees the state that produced them
        grouped: dict[str, list[EngineOutput]] = defaultdict(list)
        for out in outputs:
            grouped[out.request_id].append(out)
        self._event_loop.call_soon_threadsafe(self._deliver, dict(grouped))

    # --- engine thread ----------------------------------------------------------------------

    def _run(self, ready: asyncio.Future) -> None:
        try:
            self._build()
        except BaseException as exc:
            self._event_loop.call_soon_threadsafe(_settle, ready, exc)
            return
        self._event_loop.call_soon_threadsafe(_settle, ready, None)
        try:
            while self._drain(block=not self._sched.has_work):
                if self._sched.has_work:
                    self._step()
                self._publish_stats()
            for rid in list(self._sched.requests):
                self._send(self._sched.abort(rid))
            self._publish_stats()
        except BaseException as exc:  # the engine's state can no longer be trusted
            log.exception("torch engine died")
            self._dead = f"engine failure: {type(exc).__name__}: {exc}"
            self._event_loop.call_soon_threadsafe(self._fail_all, self._dead)

    def _drain(self, block: bool) -> bool:
        """Applies queued adds and aborts; False once shutdown was asked for."""
        items = [self._inbox.get()] if block else []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if isinstance(item, Shutdown):
                return False
            if isinstance(item, Add):
                try:
                    self._sched.add(item.request)
                except Overloaded as exc:
                    self._event_loop.call_soon_threadsafe(self._deliver,
                                                    {item.request.request_id: exc})
            elif isinstance(item, Abort):
                self._send(self._sched.abort(item.request_id))
            else:
                self._send(self._sched.finish(item.request_id, item.index))
        return True

    def _step(self) -> None:
        step = self._sched.schedule()
        if step.is_empty:
            return
        started = time.perf_counter()
        try:
            result = self._model_runner.execute(step)
        except Exception as exc:
            self._failures += 1
            if self._failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                raise
            log.exception("engine step failed; failing its %d requests", len(step.scheduled))
            message = f"engine step failed: {type(exc).__name__}: {exc}"
            for rid in dict.fromkeys(s.seq.request_id for s in step.scheduled):
                self._send(self._sched.abort(rid, error=message))
            return
        self._failures = 0
        self._send(self._sched.update(step, result))
        elapsed = (time.perf_counter() - started) * 1e3
        self._step_ms = elapsed if not self._step_ms else 0.9 * self._step_ms + 0.1 * elapsed

    def _publish_stats(self) -> None:
        sched = self._sched
        bm = sched.block_manager
        self._stats = EngineStats(
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_cached=bm.num_cached_free,
            block_size=bm.block_size,
            prefix_hit_rate=sched.prefix_hit_rate,
            running=len(sched.running),
            waiting=len(sched.waiting),
            step_time_ms=self._step_ms,  # moving average over recent steps
        )
