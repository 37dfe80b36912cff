"""The gateway's generations over GenerateMany calls (llm_service/multiplex.py).

Each HTTP request still gets one call-like object (`StreamCall`: `read()` until EOF,
`cancel()`), so `Generation` reads it as it reads a Generate call; underneath, every
generation shares one long-lived bidirectional call per `Streams` slot, and a batch of
events (one per generation an engine step advanced) arrives as one gRPC message.

A call that breaks (the LLM service restarted, the connection dropped) fails the
generations open on it with its status, as their own calls would have failed, and the next
generation opens a new one. With several slots on a round-robin channel (a dns:/// target),
each slot's call goes to the next address, and a new generation takes the slot with the
fewest open.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from mmserve.tracing import inject
from protos import llm_pb2

log = logging.getLogger(__name__)

_STATUS = {code.value[0]: code for code in grpc.StatusCode}
# How long past its deadline a generation waits for the LLM service to end it before the
# gateway gives up on its own: the service enforces `timeout_s`, this covers a stuck one.
_DEADLINE_SLACK_S = 5.0
_EOF = object()


def _rpc_error(code: grpc.StatusCode, message: str,
               trailing: tuple[tuple[str, str], ...] = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing),
                                details=message)


class StreamCall:
    """One generation on a multiplexed call, read like a Generate call."""

    def __init__(self, mux: _Mux, stream_id: int, timeout_s: float) -> None:
        self._mux = mux
        self.stream_id = stream_id
        self._items: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._done = False  # ended (last event in `_items`) or cancelled
        self._cancelled = False
        self._timer = asyncio.get_running_loop().call_later(
            timeout_s + _DEADLINE_SLACK_S, self._expire)

    async def read(self) -> Any:
        """The next GenerateResponse, grpc.aio.EOF after the last; raises the generation's
        error as grpc.aio.AioRpcError, asyncio.CancelledError once cancelled."""
        while not self._items:
            if self._cancelled:
                raise asyncio.CancelledError()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if item is _EOF:
            self._items.appendleft(item)
            return grpc.aio.EOF
        if isinstance(item, grpc.aio.AioRpcError):
            self._items.appendleft(item)
            raise item
        return item

    async def __aiter__(self) -> AsyncIterator[llm_pb2.GenerateResponse]:
        while (response := await self.read()) is not grpc.aio.EOF:
            yield response

    def cancel(self) -> bool:
        """Aborts the generation (its KV cache is freed); a pending read() raises
        CancelledError. False when it had already ended."""
        if self._done:
            return False
        self._done = self._cancelled = True
        self._timer.cancel()
        self._mux.cancel(self.stream_id)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()
        return True

    def _push(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _end(self, item: Any) -> None:
        if not self._done:
            self._done = True
            self._timer.cancel()
            self._push(item)

    def _expire(self) -> None:
        if not self._done:
            self._mux.cancel(self.stream_id)
            self._end(_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))


class _Mux:
    """One GenerateMany call, opened on first use and again after it ends."""

    def __init__(self, open_call: Callable[[AsyncIterator[llm_pb2.GenerateCommand]], Any]) -> None:
        self._open_call = open_call
        self._call: Any = None
        self._streams: dict[int, StreamCall] = {}
        self._ids = itertools.count(1)
        self._outgoing: asyncio.Queue[llm_pb2.GenerateCommand | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def start(self, start: llm_pb2.StartGeneration) -> StreamCall:
        if self._call is None:
            self._outgoing = asyncio.Queue()
            self._call = self._open_call(self._commands(self._outgoing))
            self._reader = asyncio.create_task(self._read(self._call))
        stream_id = next(self._ids)
        stream = StreamCall(self, stream_id, start.timeout_s)
        self._streams[stream_id] = stream
        self._outgoing.put_nowait(llm_pb2.GenerateCommand(stream_id=stream_id, start=start))
        return stream

    def cancel(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None:
            self._outgoing.put_nowait(llm_pb2.GenerateCommand(stream_id=stream_id, cancel=True))

    @staticmethod
    async def _commands(queue: asyncio.Queue[llm_pb2.GenerateCommand | None]
                        ) -> AsyncIterator[llm_pb2.GenerateCommand]:
        while (command := await queue.get()) is not None:
            yield command

    async def _read(self, call: Any) -> None:
        error = _rpc_error(grpc.StatusCode.UNAVAILABLE, "the LLM service closed the stream")
        try:
            async for batch in call:
                for event in batch.events:
                    stream = self._streams.get(event.stream_id)
                    if stream is None:
                        continue  # cancelled here; its last events were on the way
                    if event.WhichOneof("event") == "response":
                        stream._push(event.response)
                        continue
                    del self._streams[event.stream_id]
                    end = event.end
                    stream._end(_EOF if end.code == 0 else _rpc_error(
                        _STATUS.get(end.code, grpc.StatusCode.UNKNOWN), end.message,
                        (("retry-after", str(end.retry_after_s)),) if end.retry_after_s else ()))
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            error = _rpc_error(grpc.StatusCode.CANCELLED, "the gateway is closing")
            raise
        finally:
            if self._call is call:
                self._call = None
                self._outgoing.put_nowait(None)
            streams, self._streams = self._streams, {}
            if streams:
                log.warning("GenerateMany call ended (%s: %s) with %d generations open",
                            error.code().name, error.details(), len(streams))
            for stream in streams.values():
                stream._end(error)

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


class Streams:
    """`slots` GenerateMany calls on one channel; each generation goes to the least busy."""

    def __init__(self, open_call: Callable[[AsyncIterator[llm_pb2.GenerateCommand]], Any],
                 slots: int) -> None:
        self._muxes = [_Mux(open_call) for _ in range(slots)]

    def start(self, request: llm_pb2.GenerateRequest, timeout_s: float,
              tenant: str = "") -> StreamCall:
        start = llm_pb2.StartGeneration(request=request, timeout_s=timeout_s, tenant=tenant,
                                        request_id=request.request_id,
                                        trace_context=dict(inject()))
        return min(self._muxes, key=lambda mux: mux.open_streams).start(start)

    async def close(self) -> None:
        await asyncio.gather(*(mux.close() for mux in self._muxes))
