"""The gateway's ASGI application."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway.auth import ApiKeyMiddleware
from gateway.body_limit import BodyLimitMiddleware
from gateway.config import GatewayConfig
from gateway.drain import Drain, DrainMiddleware
from gateway.errors import install_handlers
from gateway.key_limits import KeyConcurrencyMiddleware
from gateway.llm_client import LLMClient
from gateway.metrics import GatewayMetrics
from gateway.request_log import RequestLogMiddleware
from gateway.routes import chat, completions, health, metrics, models, web
from gateway.served_model import ServedModel
from gateway.trace import TraceMiddleware
from mmserve.tracing import Tracing


def create_app(config: GatewayConfig,
               llm_client_factory: Callable[[GatewayConfig], LLMClient] = LLMClient.from_config,
               tracing: Tracing | None = None) -> FastAPI:
    """The OpenAI-compatible REST app in front of the LLM service.

    `llm_client_factory` builds the LLM client when the app starts; tests pass
    their own to point the gateway at a fake. `tracing`: default from `config.otlp_endpoint`.
    """
    tracing = tracing or Tracing.configure("mmserve-gateway", config.otlp_endpoint)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The gRPC channel belongs to the event loop that serves the app.
        llm = llm_client_factory(config)
        app.state.llm = llm
        app.state.served_model = ServedModel(llm, config.model_name)
        try:
            yield
        finally:
            await llm.close()
            tracing.shutdown()

    app = FastAPI(title="mmserve gateway", summary="OpenAI-compatible API for mmserve",
                  lifespan=lifespan)
    app.state.config = config
    app.state.metrics = GatewayMetrics()
    app.state.drain = Drain()
    for module in (chat, completions, models, health, metrics, web):
        app.include_router(module.router)
    app.mount(web.STATIC_PREFIX.rstrip("/"), web.static_files(), name="web")
    install_handlers(app)
    # Each add wraps the previous one, so the log (added last) sees every
    # response, a draining gateway refuses before anything else, and the key is
    # checked (then its concurrency) before any body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes,
                       timeout_s=config.body_timeout_s)
    app.add_middleware(KeyConcurrencyMiddleware, limit=config.max_concurrent_per_key)
    app.add_middleware(ApiKeyMiddleware, api_keys=config.api_keys)
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    app.add_middleware(TraceMiddleware, tracing=tracing)
    app.add_middleware(RequestLogMiddleware, metrics=app.state.metrics)
    return app
