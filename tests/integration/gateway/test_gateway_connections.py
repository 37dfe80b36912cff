"""Connection limits on the real uvicorn server, probed with raw sockets (issue 13, gap 6):
silent and slow-header connections are closed, slow bodies get 408, a connection cap turns
extra requests into 503, and an SSE stream longer than every timeout still finishes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator

import pytest
import uvicorn

from gateway.__main__ import server_options
from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.connections import header_timeout_protocol
from polling import eventually

HEADER_S, BODY_S = 0.5, 1.0
BODY = json.dumps({"messages": [{"role": "user", "content": "one two three four five six"}],
                   "stream": True}).encode()


async def serve(config: GatewayConfig, parser: str = "auto") -> AsyncIterator[int]:
    options = server_options(config) | {"http": header_timeout_protocol(config.header_timeout_s,
                                                                        parser)}
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=0,
                                           log_level="warning", timeout_graceful_shutdown=1,
                                           **options))
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started or task.done())
    if task.done():
        task.result()
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    await task


@pytest.fixture(params=["httptools", "h11"])
async def port(config, request) -> AsyncIterator[int]:
    """The gateway on each of uvicorn's HTTP parsers (httptools is the default where it is
    installed; h11 is the fallback)."""
    limited = dataclasses.replace(config, api_keys=(), header_timeout_s=HEADER_S,
                                  body_timeout_s=BODY_S)
    async for value in serve(limited, request.param):
        yield value


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent before closing; fails if it is still open after `seconds`."""
    return await asyncio.wait_for(reader.read(), seconds)


async def test_silent_connections_are_closed_after_the_header_timeout(port):
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(50)]
    started = time.monotonic()
    assert await asyncio.gather(*(closed_within(r, 5) for r, _ in connections)) == [b""] * 50
    assert time.monotonic() - started >= HEADER_S * 0.8
    for _, writer in connections:
        writer.close()


async def test_headers_sent_a_byte_at_a_time_do_not_hold_the_connection(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n"

    async def dribble() -> None:
        for byte in request:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)  # the whole request would take 6 s

    sender = asyncio.create_task(dribble())
    try:
        assert await closed_within(reader, 4) == b""
    finally:
        sender.cancel()
        writer.close()


async def test_a_kept_alive_connection_gets_a_new_header_deadline(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n")
    assert (await reader.readuntil(b'{"status":"ok"}')).startswith(b"HTTP/1.1 200")
    writer.write(b"GET /health HTTP/1.1\r\nHost: ga")  # and never the rest
    assert await closed_within(reader, 4) == b""
    writer.close()


async def test_a_slow_body_gets_408(port, fake_llm):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
                 b"Content-Type: application/json\r\n"
                 + f"Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY[:10])
    started = time.monotonic()
    answer = await closed_within(reader, 5)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"code":"request_timeout"' in answer
    assert time.monotonic() - started >= BODY_S * 0.8
    assert fake_llm.requests == []
    writer.close()


async def test_an_sse_stream_longer_than_the_timeouts_finishes(port, fake_llm):
    fake_llm.delay_s = 0.3  # 7 deltas: about 2 s, past both timeouts
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\n"
                 + f"Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY)
    started = time.monotonic()
    answer = await closed_within(reader, 20)
    assert time.monotonic() - started > HEADER_S + BODY_S
    assert answer.startswith(b"HTTP/1.1 200") and answer.rstrip().endswith(b"0")  # chunked end
    assert b"data: [DONE]" in answer and b" six" in answer
    writer.close()


async def test_requests_past_the_connection_limit_get_503(config):
    limited = dataclasses.replace(config, api_keys=(), header_timeout_s=30, max_connections=4)
    async for port in serve(limited):
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        assert (await closed_within(reader, 5)).startswith(b"HTTP/1.1 503")
        for _, other in idle:
            other.close()
        writer.close()
