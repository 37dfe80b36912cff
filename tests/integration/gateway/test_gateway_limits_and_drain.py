"""Per-API-key concurrency limits and the gateway's drain, against the fake LLM service:
in-process, and with the real uvicorn server that a SIGTERM drains."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.drain import DrainingServer
from gateway_fake_llm import MODEL_ID
from polling import eventually

BODY = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}


async def test_per_key_limit_refuses_the_extra_request_of_that_key_only(configured_client,
                                                                        fake_llm):
    fake_llm.first_delay_s = 0.5
    async with configured_client(api_keys=("k1", "k2"), max_concurrent_per_key=1) as client:
        def post(key: str):
            return client.post("/v1/chat/completions", json=BODY,
                               headers={"Authorization": f"Bearer {key}"})

        first = asyncio.create_task(post("k1"))
        await eventually(lambda: len(fake_llm.requests) == 1)
        refused, other = await asyncio.gather(post("k1"), post("k2"))
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "concurrency_limit_exceeded"
        assert error["type"] == "rate_limit_error"
        assert "max_concurrent_per_key=1" in error["message"]
        assert int(refused.headers["Retry-After"]) >= 1
        assert other.status_code == 200  # another tenant is not affected
        assert (await first).status_code == 200
        assert (await post("k1")).status_code == 200  # the slot came back
        assert len(fake_llm.requests) == 3


async def test_without_the_flag_there_is_no_per_key_limit(configured_client, fake_llm):
    fake_llm.first_delay_s = 0.3
    async with configured_client() as client:
        replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=BODY)
                                         for _ in range(4)))
    assert [r.status_code for r in replies] == [200] * 4


async def test_sigterm_drains_streams_then_the_server_exits(llm_server, fake_llm):
    fake_llm.delay_s = 0.2  # a stream of several chunks takes about a second
    app = create_app(GatewayConfig(host="127.0.0.1", port=0, llm_address=llm_server.address))
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=1),
                            app.state.drain, grace_s=30)
    serving = asyncio.create_task(server.serve())
    await eventually(lambda: server.started or serving.done())
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        async with client.stream("POST", "/v1/chat/completions",
                                 json={**BODY, "stream": True}) as stream:
            lines = stream.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            started = time.monotonic()
            server.handle_exit(signal.SIGTERM, None)
            ready = await client.get("/ready")
            assert ready.status_code == 503 and ready.json() == {"status": "draining"}
            refused = await client.post("/v1/chat/completions", json=BODY)
            assert refused.status_code == 503
            assert "shutting down" in refused.json()["error"]["message"]
            rest = [line async for line in lines]
        assert "data: [DONE]" in rest  # the stream ran to its end
    await asyncio.wait_for(serving, timeout=10)
    assert time.monotonic() - started < 10
