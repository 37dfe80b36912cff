"""Liveness and readiness probes."""

from __future__ import annotations


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
    """Readiness: not draining, the LLM service's gRPC health check reports SERVING, and so
    does the encoder behind it, when it has one."""
    if request.app.state.drain.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    llm = request.app.state.llm
    if not await llm.is_serving():
        return JSONResponse({"status": "unavailable", "reason": "llm"}, status_code=503)
    if await llm.encoder_serving() is False:
        return JSONResponse({"status": "unavailable", "reason": "encoder"}, status_code=503)
    return JSONResponse({"status": "ready"})
