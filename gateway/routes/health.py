"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers. It says nothing about the LLM service, so
    an LLM outage does not get every gateway restarted."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: the LLM service's gRPC health check reports SERVING, and so does its
    encoder pool entry (a hung or stopped encoder makes image requests fail)."""
    llm = request.app.state.llm
    serving, encoders = await asyncio.gather(llm.is_serving(), llm.encoders_serving())
    if serving and encoders:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "unavailable", "llm": serving, "encoder": encoders},
                        status_code=503)
