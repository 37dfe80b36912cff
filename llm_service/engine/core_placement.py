"""Where the step loop runs: a process of its own (the default) or a thread of the service.

In its own process the loop never waits for the service's GIL: the event loop's per-token
work (detokenizing, protobuf, gRPC) and the engine's Python between torch ops stop taking
turns, as in vLLM's engine-core process. Both placements exchange `core_messages` with
TorchEngine through `send()` and an `on_message` callback.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import sys
import threading
from collections.abc import Callable

from llm_service.engine.config import EngineConfig
from llm_service.engine.core_messages import Failed, FromCore, Stop, ToCore
from llm_service.engine.engine_core import EngineCore, serve_core


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
