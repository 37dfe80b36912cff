"""The encoder pool as the LLM service's health reports it.

The LLM service's own entry ("") says whether it can generate; the `ENCODER_POOL_HEALTH`
entry says whether any encoder replica is up (health-checked with a timeout, so a hung
one counts as down). The gateway's /ready reads both.
"""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health, health_pb2

from llm_service.config import LLMConfig
from llm_service.encoder_pool import EncoderPool, PoolSettings
from mmserve.rpc.server import ENCODER_POOL_HEALTH


def pool_settings(config: LLMConfig) -> PoolSettings:
    return PoolSettings(health_interval_s=config.encoder_health_interval_s,
                        health_timeout_s=config.encoder_health_timeout_s,
                        affinity=config.encoder_affinity)


async def report_encoders(pool: EncoderPool, servicer: health.aio.HealthServicer,
                          interval_s: float = 0.5) -> None:
    """Keeps the pool's entry current until cancelled."""
    serving: bool | None = None
    while True:
        now = pool.healthy
        if now != serving:
            await servicer.set(ENCODER_POOL_HEALTH,
                               health_pb2.HealthCheckResponse.SERVING if now
                               else health_pb2.HealthCheckResponse.NOT_SERVING)
            serving = now
        await asyncio.sleep(interval_s)
