"""A fake LLM service on a real gRPC port, and the gateway in front of it:
in-process (httpx ASGITransport) or served by uvicorn on a free port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
import pytest
import uvicorn
from gateway_fake_llm import FakeLLM, FakeLLMServer
from fastapi import FastAPI

from gateway.app import create_app
from gateway.config import GatewayConfig
from polling import eventually

API_KEY = "sk-test-key"


@pytest.fixture
async def llm_server() -> AsyncIterator[FakeLLMServer]:
    server = FakeLLMServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def fake_llm(llm_server: FakeLLMServer) -> FakeLLM:
    return llm_server.llm


@pytest.fixture
def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(params=[1, 0], ids=["GenerateMany", "Generate"])
def config(llm_server: FakeLLMServer, request: pytest.FixtureRequest) -> GatewayConfig:
    """Every gateway test runs over both transports: generations multiplexed on one
    GenerateMany call (the default), and one Generate call each."""
    return GatewayConfig(host="127.0.0.1", port=0, llm_address=llm_server.address,
                         api_keys=(API_KEY,), llm_streams=request.param)


@pytest.fixture
def app(config: GatewayConfig) -> FastAPI:
    return create_app(config)


@pytest.fixture
async def client(app: FastAPI, auth_headers: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://gateway",
                                     headers=auth_headers) as client:
            yield client


@pytest.fixture
def configured_client(llm_server: FakeLLMServer
                      ) -> Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]:
    """A client for a gateway built with config overrides (no API key unless given)."""

    @asynccontextmanager
    async def make(**overrides: object) -> AsyncIterator[httpx.AsyncClient]:
        config = GatewayConfig(**{"llm_address": llm_server.address, **overrides})
        app = create_app(config)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://gateway") as client:
                yield client

    return make


@pytest.fixture
async def gateway_url(app: FastAPI) -> AsyncIterator[str]:
    """The gateway served by a real uvicorn on a free port, in this event loop."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=1))
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started or task.done())
    if task.done():
        task.result()
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task

