"""The torch engine's step loop (schedule -> execute -> update), driven by typed messages.

`core_placement` runs it in a thread of the service or in a process of its own; the loop is
the same either way and sees only `core_messages`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures

from llm_service.engine.config import EngineConfig
from llm_service.engine.core_messages import (
    Abort, Add, Failed, Finish, FromCore, Outputs, Rejected, Started, Stop, ToCore)
from llm_service.engine.errors import InvalidRequest, Overloaded
from llm_service.engine.grammar import CompiledGrammar, GrammarCompiler, checkpoint_tokenizer
from llm_service.engine.protocol import EngineOutput, EngineRequest, EngineStats

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_STEP_FAILURES = 3  # then the engine is considered broken, not the requests
COMPILE_POLL_S = 0.005  # how often an idle loop looks at grammars being compiled


class EngineCore:
    """Scheduler + model runner. Every method runs on the loop's own thread."""

    def __init__(self, config: EngineConfig) -> None:
        from llm_service.engine.block_manager import BlockManager
        from llm_service.engine.model_runner import ModelRunner  # torch loads with the model
        from llm_service.engine.scheduler import Scheduler

        self.config = config
        self.runner = ModelRunner(config)
        self.scheduler = Scheduler(
            BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching),
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.runner.max_model_len, max_waiting=config.max_waiting,
            scheduling=config.scheduling)
        self._step_ms = 0.0
        self._failures = 0
        # Structured outputs compile on a thread of their own, so a step never waits for one;
        # a request joins the scheduler once its grammar is ready.
        vocab = self.runner.spec.vocab_size
        self.grammars = GrammarCompiler(lambda: checkpoint_tokenizer(config.model_dir, vocab))
        self._compiler = futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self._compiling: dict[str, tuple[EngineRequest, futures.Future[CompiledGrammar]]] = {}
        self._compiler.submit(self.grammars.prepare)
        if config.warm_up:
            self.warm_up()

    def warm_up(self) -> None:
        """Runs two short requests through the whole step path before the first real one:
        oneDNN builds its kernels for a shape on first use, and the first request after
        start would otherwise wait for that (seen here: 726 ms instead of 130 ms to the
        first token). Leaves no request, no held block and no statistics behind."""
        from llm_service.engine.protocol import SamplingParams

        sched = self.scheduler
        vocab = self.runner.spec.vocab_size
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        # Prompt and output within the context, however short the configured one is.
        room = self.runner.max_model_len - params.max_tokens
        for k in range(min(2, sched.max_waiting, sched.max_num_seqs)):
            length = min(32 + 16 * k, room)
            if length < 1:
                break
            ids = [(7 + 13 * k + 31 * i) % vocab for i in range(length)]
            sched.add(EngineRequest(f"warm-up-{k}", ids, params))
        while sched.has_work:
            self.step()
        sched.num_queried_tokens = sched.num_hit_tokens = sched.num_preemptions = 0
        self._step_ms = 0.0

    def started(self) -> Started:
        runner = self.runner
        return Started(runner.spec.family, str(runner.device), str(runner.dtype).split(".")[-1],
                       runner.num_blocks, self.config.block_size, runner.spec.hidden_size,
                       runner.spec.vocab_size, runner.max_model_len)

    def run(self, receive: Callable[[bool], list[ToCore]],
            send: Callable[[FromCore], None]) -> None:
        """Applies messages and steps until Stop; `receive(block)` waits for messages only
        when there is nothing to compute."""
        sched = self.scheduler
        try:
            while True:
                if self._compiling and not sched.has_work:
                    futures.wait([f for _, f in self._compiling.values()], COMPILE_POLL_S,
                                 futures.FIRST_COMPLETED)
                for message in receive(not sched.has_work and not self._compiling):
                    if isinstance(message, Stop):
                        self._compiling.clear()
                        outputs = [o for rid in list(sched.requests) for o in sched.abort(rid)]
                        send(Outputs(outputs, self.stats()))
                        return
                    self._apply(message, send)
                self._admit_compiled(send)
                self._step_and_send(send)
        finally:
            self._compiler.shutdown(wait=False, cancel_futures=True)

    def _apply(self, message: ToCore, send: Callable[[FromCore], None]) -> None:
        sched = self.scheduler
        if isinstance(message, Add):
            self._add(message.request, send)
        elif isinstance(message, Finish):
            send(Outputs(sched.finish(message.request_id, message.index), self.stats()))
        elif isinstance(message, Abort) and self._compiling.pop(message.request_id, None) is None:
            send(Outputs(sched.abort(message.request_id), self.stats()))

    def _step_and_send(self, send: Callable[[FromCore], None]) -> None:
        if self.scheduler.has_work:
            # Sent after every step, even one with no tokens (a prompt chunk), so that
            # stats follow the KV cache as it fills.
            send(Outputs(self.step(), self.stats()))

    def _add(self, request: EngineRequest, send: Callable[[FromCore], None]) -> None:
        spec = request.sampling.structured
        if spec is not None:
            self._compiling[request.request_id] = (
                request, self._compiler.submit(self.grammars.compile, spec))
            return
        try:
            self.scheduler.add(request)
        except Overloaded as exc:
            send(Rejected(request.request_id, str(exc)))

    def _admit_compiled(self, send: Callable[[FromCore], None]) -> None:
        """Queues the requests whose grammar is ready, or refuses them."""
        for rid, (request, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[rid]
            try:
                self.scheduler.add(request, future.result())
            except InvalidRequest as exc:
                send(Rejected(rid, str(exc), invalid=True))
            except Overloaded as exc:
                send(Rejected(rid, str(exc)))
            except Exception as exc:  # a compiler failure fails this request, not the engine
                log.exception("compiling the structured output of %s failed", rid)
                send(Rejected(rid, f"structured output could not be compiled: "
                                   f"{type(exc).__name__}: {exc}", invalid=True))

    def step(self) -> list[EngineOutput]:
        step = self.scheduler.schedule()
        if step.is_empty:
            return []
        started = time.perf_counter()
        try:
            result = self.runner.execute(step)
        except Exception as exc:
            self._failures += 1
            if self._failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                raise
            log.exception("engine step failed; failing its %d requests", len(step.scheduled))
            message = f"engine step failed: {type(exc).__name__}: {exc}"
            return [o for rid in dict.fromkeys(s.seq.request_id for s in step.scheduled)
                    for o in self.scheduler.abort(rid, error=message)]
        self._failures = 0
        outputs = self.scheduler.update(step, result)
        elapsed = (time.perf_counter() - started) * 1e3
        self._step_ms = elapsed if not self._step_ms else 0.9 * self._step_ms + 0.1 * elapsed
        return outputs

    def stats(self) -> EngineStats:
        sched = self.scheduler
        bm = sched.block_manager
        return EngineStats(
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_cached=bm.num_cached_free,
            block_size=bm.block_size,
            prefix_hit_rate=sched.prefix_hit_rate,
            running=len(sched.running),
            waiting=len(sched.waiting),
            step_time_ms=self._step_ms,  # moving average over recent steps
            num_preemptions=sched.num_preemptions,
        )


def serve_core(core_factory: Callable[[], EngineCore], receive, send) -> None:
    """Builds the core and runs it; whatever goes wrong ends as one Failed message."""
    try:
        core = core_factory()
    except Exception as exc:
        send(Failed(str(exc), at_start=True, kind=type(exc).__name__))
        return
    send(core.started())
    try:
        core.run(receive, send)
    except Exception as exc:  # the engine's state can no longer be trusted
        log.exception("torch engine died")
        send(Failed(f"engine failure: {_describe(exc)}"))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
