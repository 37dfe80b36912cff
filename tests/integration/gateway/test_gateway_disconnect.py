"""A client that goes away must cancel the gRPC call, so the engine frees the request."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from polling import eventually

SLOW = {"messages": [{"role": "user", "content": " ".join(["word"] * 50)}]}


async def test_stream_disconnect_cancels_the_call(gateway_url, fake_llm, auth_headers,
                                                  caplog) -> None:
    fake_llm.delay_s = 0.2  # 50 words: about 10 s if nobody cancels
    with caplog.at_level(logging.INFO, logger="gateway.requests"):
        async with httpx.AsyncClient(base_url=gateway_url, headers=auth_headers) as client:
            async with client.stream("POST", "/v1/chat/completions",
                                     json={**SLOW, "stream": True}) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                first = await anext(lines)
                assert '"role":"assistant"' in first
            # Leaving the block closed the connection after the first chunk.
        await asyncio.wait_for(fake_llm.cancelled.wait(), timeout=5)
        assert not fake_llm.finished.is_set()
        # The stream began with 200, but it was cut short: logged and counted as 499.
        line = await eventually(lambda: next((r.getMessage() for r in caplog.records
                                              if "http=/v1/chat/completions" in r.getMessage()),
                                             None), 5, "no request log line")
        assert " status=499 " in line


async def test_non_stream_disconnect_cancels_the_call(gateway_url, fake_llm, auth_headers) -> None:
    fake_llm.delay_s = 0.2
    async with httpx.AsyncClient(base_url=gateway_url, headers=auth_headers, timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/chat/completions", json=SLOW)
    await asyncio.wait_for(fake_llm.cancelled.wait(), timeout=5)
    assert not fake_llm.finished.is_set()


async def test_disconnect_before_the_first_token_cancels_the_call(gateway_url, fake_llm, auth_headers) -> None:
    fake_llm.first_delay_s = 10  # a long prefill
    async with httpx.AsyncClient(base_url=gateway_url, headers=auth_headers, timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/chat/completions", json={**SLOW, "stream": True})
        await asyncio.wait_for(fake_llm.cancelled.wait(), timeout=5)
        metrics = (await client.get("/metrics")).text
    assert 'requests_total{route="/v1/chat/completions",status="499"} 1.0' in metrics


async def test_finished_stream_is_not_cancelled(gateway_url, fake_llm, auth_headers,
                                                caplog) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.requests"):
        async with httpx.AsyncClient(base_url=gateway_url, headers=auth_headers) as client:
            response = await client.post("/v1/chat/completions", json={**SLOW, "stream": True})
        await asyncio.sleep(0.2)  # the client has closed its connection by now
    assert response.text.endswith("data: [DONE]\n\n")
    assert fake_llm.finished.is_set() and not fake_llm.cancelled.is_set()
    lines = [r.getMessage() for r in caplog.records if "http=/v1/chat" in r.getMessage()]
    assert len(lines) == 1 and " status=200 " in lines[0]
