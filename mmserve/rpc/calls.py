"""One RPC call at the edge: its error -> status mapping and its one log line.

Every handler of both servers is wrapped by `rpc_method`. An exception leaving the handler
becomes a status once, here: errors listed in the service's table keep their message (it
tells the caller what to change); anything else is logged with its traceback and reaches
the caller as a bare INTERNAL. Each call ends with one log line with the same keys in
every service: `rpc=<method> request_id=<id> status=<code> ms=<elapsed>`, then the fields
the handler added to `call.fields`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

StatusTable = Mapping[type[BaseException], grpc.StatusCode]
INTERNAL_MESSAGE = "internal error; see the server log"


def status_for(error: BaseException, table: StatusTable) -> grpc.StatusCode:
    """The status of the closest class of `error` in `table`; INTERNAL for anything else."""
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    return grpc.StatusCode.INTERNAL


def request_id_of(request: Any, context: grpc.aio.ServicerContext) -> str:
    """The `x-request-id` metadata value (propagated gateway -> llm -> encoder), else the
    request's own `request_id` field, else a new id."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return str(value)
    own = getattr(request, "request_id", "")
    return str(own) if own else uuid.uuid4().hex[:16]


@dataclass(slots=True)
class Call:
    """What a handler knows about its call; `fields` go into the call's log line."""

    rpc: str
    request_id: str
    fields: dict[str, object] = field(default_factory=dict)
    status: str = "OK"


def failure(call: Call, error: BaseException, table: StatusTable,
            log: logging.Logger) -> tuple[grpc.StatusCode, str]:
    """The status and message `error` ends `call` with: a listed error keeps its message,
    anything else is logged with its traceback and becomes a bare INTERNAL."""
    code = status_for(error, table)
    call.status = code.name
    if code is not grpc.StatusCode.INTERNAL:
        return code, str(error)
    log.error("rpc=%s request_id=%s failed", call.rpc, call.request_id, exc_info=error)
    return code, INTERNAL_MESSAGE


def log_line(call: Call, started: float) -> str:
    extra = "".join(f" {key}={value}" for key, value in call.fields.items())
    return (f"rpc={call.rpc} request_id={call.request_id} status={call.status} "
            f"ms={(time.perf_counter() - started) * 1000:.1f}{extra}")


def rpc_method(table: StatusTable, log: logging.Logger) -> Callable[[Callable[..., Any]],
                                                                     Callable[..., Any]]:
    """Wraps a unary or server-streaming handler `(self, request, context, call)` into the
    `(self, request, context)` grpc.aio calls, mapping errors and logging once per call."""

    def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
        name = handler.__name__

        async def fail(call: Call, context: grpc.aio.ServicerContext,
                       error: BaseException) -> None:
            await context.abort(*failure(call, error, table, log))

        if inspect.isasyncgenfunction(handler):
            @functools.wraps(handler)
            async def stream(self: Any, request: Any,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                call, started = Call(name, request_id_of(request, context)), time.perf_counter()
                try:
                    async for response in handler(self, request, context, call):
                        yield response
                except asyncio.CancelledError:
                    call.status = "CANCELLED"
                    raise
                except Exception as error:
                    await fail(call, context, error)
                finally:
                    log.info("%s", log_line(call, started))
            return stream

        @functools.wraps(handler)
        async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            call, started = Call(name, request_id_of(request, context)), time.perf_counter()
            try:
                return await handler(self, request, context, call)
            except asyncio.CancelledError:
                call.status = "CANCELLED"
                raise
            except Exception as error:
                await fail(call, context, error)
            finally:
                log.info("%s", log_line(call, started))
        return unary

    return decorate
