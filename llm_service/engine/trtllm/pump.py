"""The one thread that waits on the executor and hands its responses to the event loop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

log = logging.getLogger(__name__)


class ResponsePump:
    """Loops `await_responses(timeout=...)` and drains iteration stats between waits.

    The timeout matters: without one, the call blocks until some request responds, so
    the thread could never notice `stop()` on an idle executor. Callbacks run on this
    thread; they must only hand work over (e.g. `loop.call_soon_threadsafe`).
    """

    def __init__(self, executor, await_timeout: timedelta, stats_interval_s: float,
                 on_responses: Callable[[list], None], on_stats: Callable[[list], None],
                 on_fatal: Callable[[str], None]) -> None:
        self._executor = executor
        self._timeout = await_timeout
        self._stats_interval_s = stats_interval_s
        self._on_responses = on_responses
        self._on_stats = on_stats
        self._on_fatal = on_fatal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trtllm-response-pump", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> bool:
        """Asks the thread to exit and waits for it; False if it did not exit in time."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        next_stats = time.monotonic() + self._stats_interval_s
        while not self._stop.is_set():
            try:
                responses = self._executor.await_responses(timeout=self._timeout)
                if responses:
                    self._on_responses(responses)
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + self._stats_interval_s
                    self._on_stats(self._executor.get_latest_iteration_stats())
            except Exception as exc:  # the executor itself failed: every request is lost
                if self._stop.is_set():
                    return
                log.exception("TensorRT-LLM executor failed")
                self._on_fatal(f"TensorRT-LLM executor failed: {exc}")
                return
