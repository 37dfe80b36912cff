"""A failing encoder address among live ones: calls on it are retried once on another replica
and it is ejected; with none up, a clear 503 at once; a request's deadline bounds each call."""

from __future__ import annotations

import io
import socket
import time

import pytest
import torch
from PIL import Image

from encoder_service.config import EncoderConfig
from encoder_service.server import EncoderServer
from encoder_service.towers.demo import DemoTower
from llm_service.encoder_client import EncoderClient
from llm_service.encoder_pool import PoolSettings
from llm_service.errors import Unavailable
from llm_service.server import input_from_pb, tenant_of
from mmserve.wire.media import TENANT_METADATA, MediaItem, MediaRef
from protos import llm_pb2



def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (shade, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: connections are refused


@pytest.fixture
async def live():
    server = EncoderServer(EncoderConfig(host="127.0.0.1", port=0, max_tiles=1),
                           tower=DemoTower(hidden_size=576, dtype=torch.float32, seed=0))
    await server.start()
    yield server
    await server.stop(grace=0)


async def test_a_dead_replica_is_ejected_and_its_calls_retried_elsewhere(live):
    dead = dead_address()
    client = EncoderClient(f"{dead},127.0.0.1:{live.port}", budget_s=10,
                           pool=PoolSettings(health_interval_s=60))  # no health check helps
    await client.start()
    try:
        items = [MediaItem(MediaRef(data=png(shade))) for shade in range(0, 240, 30)]
        encoded = await client.encode(items, "r")
        assert len(encoded) == len(items) and all(e[0].num_tokens for e in encoded)
        (down,) = [e for e in client.pool.endpoints if e.address == dead]
        assert not down.up and client.pool.healthy
    finally:
        await client.close()


async def test_no_replica_up_is_a_503_at_once():
    client = EncoderClient(dead_address(), budget_s=10,
                           pool=PoolSettings(health_interval_s=0.1, health_timeout_s=0.2))
    await client.start()
    try:
        with pytest.raises(Unavailable, match="encoder service unavailable"):
            await client.encode([MediaItem(MediaRef(data=png(1)))], "first")
        started = time.monotonic()
        with pytest.raises(Unavailable, match="no encoder replica is up"):
            await client.encode([MediaItem(MediaRef(data=png(1)))], "second")
        assert time.monotonic() - started < 1
    finally:
        await client.close()


class Context:
    def __init__(self, metadata):
        self._metadata = metadata

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self):
        return 7.0


def test_the_llm_service_passes_the_tenant_and_deadline_on():
    request = llm_pb2.GenerateRequest(prompt="hi")
    context = Context(((TENANT_METADATA, "ab" * 8),))
    inp = input_from_pb(request, context.time_remaining(), tenant_of(context))
    assert (inp.tenant, inp.timeout) == ("ab" * 8, 7.0)
    assert tenant_of(Context(())) == ""
