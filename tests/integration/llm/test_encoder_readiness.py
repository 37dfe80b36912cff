"""The LLM service re-publishes its encoder's health for the gateway's /ready (gap 10)."""

from __future__ import annotations

import asyncio

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from encoder_service.config import EncoderConfig
from encoder_service.server import EncoderServer
from encoder_service.towers.demo import DemoTower
from llm_service.readiness import ENCODER_SERVICE, watch_encoder
from mmserve.rpc.server import GrpcServer


async def test_the_encoders_health_is_published_and_follows_it():
    encoder = EncoderServer(EncoderConfig(host="127.0.0.1", port=0, shm_dir=""),
                            tower=DemoTower(hidden_size=576, dtype=torch.float32, seed=0))
    await encoder.start()
    llm = GrpcServer("mmserve.llm.v1.LLM")
    port = await llm.start("127.0.0.1", 0)
    watcher = asyncio.create_task(watch_encoder(f"127.0.0.1:{encoder.port}", None, llm,
                                                interval_s=0.1, timeout_s=0.5))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)

    async def reaches(wanted: int) -> bool:
        """Whether the published status becomes `wanted` within 5 s."""
        for _ in range(50):
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=ENCODER_SERVICE))
                if reply.status == wanted:
                    return True
            except grpc.aio.AioRpcError:
                pass  # not published yet
            await asyncio.sleep(0.1)
        return False

    try:
        assert await reaches(health_pb2.HealthCheckResponse.SERVING)
        await encoder.stop(grace=0)
        assert await reaches(health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await channel.close()
        await llm.stop(0)
        await encoder.stop(grace=0)
