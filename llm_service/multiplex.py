"""GenerateMany: many generations over one gRPC call, one message per batch of events.

A Generate call costs each side a gRPC message (a completion-queue event, a wake-up of the
event loop, a serialisation) per streamed chunk; at 64 streams that is 64 messages per
decode step on the same two cores the engine computes on. Here the gateway keeps one call
open and starts and cancels generations on it by `stream_id`; every generation runs as
its own task, exactly as under Generate, and puts its responses in one outbox, which the
call sends as a single `GenerateEvents` message each time the event loop comes round:
the responses one engine step produced for all of its sequences go out together.

Each generation keeps what a Generate call has: its deadline (`timeout_s`), tenant,
request id and trace context as fields; its error as a per-stream status (`GenerationEnd`,
with retry-after when overloaded); one log line; a count in the server's drain, which
refuses new generations once draining (UNAVAILABLE, as it refuses new calls) and waits for
the running ones. A cancel command, the client going away or the call ending aborts the
generation and frees its KV cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from mmserve.rpc.calls import Call, StatusTable, failure, log_line
from mmserve.rpc.drain import DRAINING_MESSAGE, Drain
from mmserve.tracing import Tracing
from protos import llm_pb2

# (request, call, timeout_s or None, tenant) -> the Generate call's responses. Raising ends
# the generation with the error's status; `call.fields["retry_after_s"]` goes with it.
GenerateFn = Callable[[llm_pb2.GenerateRequest, Call, "float | None", str],
                      AsyncIterator[llm_pb2.GenerateResponse]]

_RPC_NAME = "Generate"  # each generation logs as the call it stands for
_TRACE_NAME = "LLM Generate"


def _status(code: grpc.StatusCode) -> int:
    return int(code.value[0])


class Multiplexer:
    """Serves GenerateMany calls with `generate`, one task per generation."""

    def __init__(self, generate: GenerateFn, table: StatusTable, log: logging.Logger,
                 drain: Drain | None = None, tracing: Tracing | None = None) -> None:
        self._generate = generate
        self._table = table
        self._log = log
        self.drain = drain or Drain()
        self.tracing = tracing or Tracing.off()

    async def serve(self, commands: AsyncIterator[llm_pb2.GenerateCommand]
                    ) -> AsyncIterator[llm_pb2.GenerateEvents]:
        """The call's event batches, until the client has half-closed and every generation
        it started has ended. Cancelling this (the client went away) aborts them all."""
        outbox: list[llm_pb2.GenerateEvent] = []
        ready = asyncio.Event()
        running: dict[int, asyncio.Task[None]] = {}

        def emit(event: llm_pb2.GenerateEvent) -> None:
            outbox.append(event)
            ready.set()

        def ended(stream_id: int, task: asyncio.Task[None]) -> None:
            if running.get(stream_id) is task:
                del running[stream_id]
            self.drain.leave()
            ready.set()

        def refuse(stream_id: int, code: grpc.StatusCode, message: str) -> None:
            emit(llm_pb2.GenerateEvent(stream_id=stream_id, end=llm_pb2.GenerationEnd(
                code=_status(code), message=message)))

        async def read() -> None:
            try:
                async for command in commands:
                    stream_id, kind = command.stream_id, command.WhichOneof("command")
                    if kind == "start":
                        if stream_id in running:
                            refuse(stream_id, grpc.StatusCode.INVALID_ARGUMENT,
                                   f"stream_id {stream_id} is already open on this call; "
                                   "use a new id for each generation")
                        elif self.drain.draining:
                            refuse(stream_id, grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
                        else:
                            self.drain.enter()
                            task = asyncio.create_task(self._run(stream_id, command.start, emit))
                            running[stream_id] = task
                            task.add_done_callback(functools.partial(ended, stream_id))
                    elif kind == "cancel" and stream_id in running:
                        running[stream_id].cancel()
            finally:
                ready.set()  # half-closed (or broken): the writer ends once nothing runs

        reader = asyncio.create_task(read())
        try:
            while True:
                await ready.wait()
                ready.clear()
                if outbox:
                    # Everything emitted since the last send: the tasks an engine step woke
                    # all ran before this one did.
                    batch = outbox[:]
                    outbox.clear()
                    yield llm_pb2.GenerateEvents(events=batch)
                elif reader.done() and not running:
                    break
        finally:
            reader.cancel()
            for task in list(running.values()):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _run(self, stream_id: int, start: llm_pb2.StartGeneration,
                   emit: Callable[[llm_pb2.GenerateEvent], None]) -> None:
        request = start.request
        call = Call(_RPC_NAME, start.request_id or request.request_id or uuid.uuid4().hex[:16])
        started = time.perf_counter()
        end = llm_pb2.GenerationEnd()
        timeout = start.timeout_s if start.timeout_s > 0 else None
        expired = False
        task = asyncio.current_task()
        assert task is not None

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = asyncio.get_running_loop().call_later(timeout, expire) if timeout else None
        try:
            with self.tracing.request(_TRACE_NAME, dict(start.trace_context),
                                      **{"rpc.method": "/mmserve.llm.v1.LLM/GenerateMany"}):
                responses = self._generate(request, call, timeout, start.tenant)
                async with contextlib.aclosing(responses):  # type: ignore[type-var]
                    async for response in responses:
                        emit(llm_pb2.GenerateEvent(stream_id=stream_id, response=response))
        except asyncio.CancelledError:
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            call.status = code.name
            end.code = _status(code)
            end.message = "Deadline Exceeded" if expired else "cancelled"
        except Exception as error:
            self._fail(call, error, end)
        finally:
            if timer is not None:
                timer.cancel()
            self._log.info("%s", log_line(call, started))
        emit(llm_pb2.GenerateEvent(stream_id=stream_id, end=end))

    def _fail(self, call: Call, error: Exception, end: llm_pb2.GenerationEnd) -> None:
        code, end.message = failure(call, error, self._table, self._log)
        end.code = _status(code)
        wait = call.fields.get("retry_after_s")
        if isinstance(wait, int):
            end.retry_after_s = wait
