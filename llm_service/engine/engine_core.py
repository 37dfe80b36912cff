"""The torch engine's step loop (schedule -> execute -> update), driven by typed messages.

It runs wherever `TorchEngine` places it: in a thread of the service, or in a process of its
own. In its own process the loop never waits for the service's GIL: the event loop's
per-token work (detokenizing, protobuf, gRPC) and the engine's Python between torch ops
stop taking turns, as in vLLM's engine-core process. Both sides exchange the same messages;
in a process they travel pickled through a pipe, tensors through shared memory.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from llm_service.engine.config import EngineConfig
from llm_service.engine.errors import Overloaded
from llm_service.engine.protocol import EngineOutput, EngineRequest, EngineStats

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_STEP_FAILURES = 3  # then the engine is considered broken, not the requests


# --- messages to the core --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Add:
    request: EngineRequest


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class Finish:
    """Ends one choice with STOP (its caller matched a stop string) and frees its blocks."""

    request_id: str
    index: int


@dataclass(frozen=True, slots=True)
class Stop:
    """Aborts whatever is left and ends the loop."""


# --- messages from the core ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Started:
    family: str
    device: str
    dtype: str
    num_blocks: int
    block_size: int
    hidden_size: int
    vocab_size: int
    max_model_len: int


@dataclass(frozen=True, slots=True)
class Outputs:
    """A step's outputs (or an abort's), with the state that produced them."""

    outputs: list[EngineOutput]
    stats: EngineStats


@dataclass(frozen=True, slots=True)
class Rejected:
    """A request the scheduler refused (its queue is full); it holds nothing."""

    request_id: str
    message: str


@dataclass(frozen=True, slots=True)
class Failed:
    """The core cannot go on (or could not start); every unfinished request fails."""

    message: str
    at_start: bool = False
    kind: str = ""  # the exception's type, for start-up failures callers tell apart


ToCore = Add | Abort | Finish | Stop
FromCore = Started | Outputs | Rejected | Failed


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
        for k in range(min(2, sched.max_waiting, sched.max_num_seqs)):
            ids = [(7 + 13 * k + 31 * i) % vocab for i in range(32 + 16 * k)]
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
        while True:
            for message in receive(not sched.has_work):
                if isinstance(message, Stop):
                    outputs = [o for rid in list(sched.requests) for o in sched.abort(rid)]
                    send(Outputs(outputs, self.stats()))
                    return
                if isinstance(message, Add):
                    self._add(message.request, send)
                elif isinstance(message, Finish):
                    send(Outputs(sched.finish(message.request_id, message.index), self.stats()))
                else:
                    send(Outputs(sched.abort(message.request_id), self.stats()))
            if sched.has_work:
                # Sent after every step, even one with no tokens (a prompt chunk), so that
                # stats follow the KV cache as it fills.
                send(Outputs(self.step(), self.stats()))

    def _add(self, request: EngineRequest, send: Callable[[FromCore], None]) -> None:
        try:
            self.scheduler.add(request)
        except Overloaded as exc:
            send(Rejected(request.request_id, str(exc)))

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


# --- in a process of its own -----------------------------------------------------------------

def process_main(config: EngineConfig, conn, log_level: int) -> None:
    """The engine process: the pipe is its whole world. A closed pipe (the service is gone)
    ends it, and on Linux so does the service's death."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _die_with_parent()
    import torch.multiprocessing  # noqa: F401  (tensors in messages travel by shared memory)

    def receive(block: bool) -> list[ToCore]:
        messages = []
        try:
            if block or conn.poll():
                messages.append(conn.recv())
            while conn.poll():
                messages.append(conn.recv())
        except (EOFError, OSError):
            raise SystemExit(0) from None  # the service closed the pipe: it is gone
        return messages

    def send(message: FromCore) -> None:
        try:
            conn.send(message)
        except (BrokenPipeError, EOFError, OSError):
            raise SystemExit(0) from None  # nobody is listening any more

    try:
        serve_core(lambda: EngineCore(config), receive, send)
    finally:
        conn.close()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class CoreProcess:
    """The parent's end of an engine process: send() from any thread; every message from
    the core goes to `on_message` on a reader thread; EOF (the process died) becomes Failed."""

    def __init__(self, config: EngineConfig, on_message: Callable[[FromCore], None]) -> None:
        import torch.multiprocessing  # noqa: F401

        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self._conn = parent
        self._on_message = on_message
        self.process = context.Process(target=process_main, name="torch-engine",
                                       args=(config, child, logging.getLogger().level),
                                       daemon=True)
        self.process.start()
        child.close()
        # A send blocks while the pipe is full (the core drains it between steps), so sends
        # go through a thread of their own, never the caller's event loop.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._writer = threading.Thread(target=self._write, name="torch-engine-writer",
                                        daemon=True)
        self._reader = threading.Thread(target=self._read, name="torch-engine-reader",
                                        daemon=True)
        self._writer.start()
        self._reader.start()

    def send(self, message: ToCore) -> None:
        if isinstance(message, Stop):
            self._stopping = True
        self._outbox.put(message)

    def _write(self) -> None:
        while True:
            message = self._outbox.get()
            if message is None:
                return
            try:
                self._conn.send(message)
            except (OSError, EOFError, ValueError):
                return  # the process is gone; the reader reports it

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                if not self._stopping:  # after Stop, the core closes its end: that is all
                    self.process.join(5)
                    self._on_message(Failed(f"the engine process exited (exit code "
                                            f"{self.process.exitcode})"))
                return
            self._on_message(message)
            if isinstance(message, Failed):
                return

    def join(self, timeout: float | None = None) -> None:
        self._outbox.put(None)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._reader.join(timeout=5)
        self._writer.join(timeout=5)
        self._conn.close()

    @property
    def alive(self) -> bool:
        return self.process.is_alive()


class CoreThread:
    """The same loop on a thread of this process (tests; no process start-up cost)."""

    def __init__(self, config: EngineConfig, on_message: Callable[[FromCore], None]) -> None:
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.core: EngineCore | None = None

        def build() -> EngineCore:
            self.core = EngineCore(config)
            return self.core

        # The model loads in this thread too: every torch op of the engine then runs in one
        # thread, so one OpenMP pool serves them (each extra pool makes all pools sleep
        # between parallel regions instead of spinning).
        self._thread = threading.Thread(target=serve_core, args=(build, self._receive, on_message),
                                        name="torch-engine", daemon=True)
        self._thread.start()

    def send(self, message: ToCore) -> None:
        self._inbox.put(message)

    def _receive(self, block: bool) -> list[ToCore]:
        messages = [self._inbox.get()] if block else []
        while True:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                return messages

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
