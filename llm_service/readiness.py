"""The encoder's health, re-published by the LLM service for the gateway's `/ready`.

The gateway talks to the LLM service only. So the LLM service checks the encoders' standard
gRPC health every few seconds (each check with a short timeout) and reports the result on
its own health service under the encoder's service name: SERVING while any encoder
answers SERVING, NOT_SERVING otherwise. The LLM service's own status ("" and its service
name) stays the engine's, so text keeps being served while the encoder is away.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve.rpc.server import GrpcServer
from protos import encoder_pb2

log = logging.getLogger(__name__)

ENCODER_SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name


async def _serving(stub: health_pb2_grpc.HealthStub, timeout_s: float) -> bool:
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=ENCODER_SERVICE),
                                 timeout=timeout_s)
    except grpc.aio.AioRpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def watch_encoder(target: str, credentials: grpc.ChannelCredentials | None,
                        server: GrpcServer, interval_s: float = 2.0,
                        timeout_s: float = 1.0) -> None:
    """Publishes the health of the encoders at `target` (comma-separated) until cancelled."""
    channels = [grpc.aio.secure_channel(a, credentials) if credentials
                else grpc.aio.insecure_channel(a)
                for a in (a.strip() for a in target.split(",")) if a]
    stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
    published: bool | None = None
    try:
        while True:
            now = any(await asyncio.gather(*(_serving(s, timeout_s) for s in stubs)))
            if now != published:
                if published is not None or not now:
                    log.warning("encoder %s", "serving again" if now else "not serving")
                await server.health.set(ENCODER_SERVICE, health_pb2.HealthCheckResponse.SERVING
                                        if now else health_pb2.HealthCheckResponse.NOT_SERVING)
                published = now
            await asyncio.sleep(interval_s)
    finally:
        await asyncio.gather(*(c.close() for c in channels))
