"""The one way tests wait for a condition: poll it until it holds or time runs out.

`wait_until` for plain code (processes, browsers), `eventually` on the event loop. Both
return the condition's first truthy value and fail with `message` (called, if it is a
function, so it can describe the state at the deadline).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
Message = str | Callable[[], str]


def _fail(message: Message, timeout_s: float) -> AssertionError:
    text = message() if callable(message) else message
    return AssertionError(f"{text} (after {timeout_s:g} s)")


def wait_until(condition: Callable[[], T], timeout_s: float = 10.0,
               message: Message = "condition not reached", interval_s: float = 0.05) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _fail(message, timeout_s)
        time.sleep(interval_s)


async def eventually(condition: Callable[[], T], timeout_s: float = 10.0,
                     message: Message = "condition not reached",
                     interval_s: float = 0.01) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _fail(message, timeout_s)
        await asyncio.sleep(interval_s)
