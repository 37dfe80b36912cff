"""Three encoder servers behind the LLM service's encoder client: a handle uploaded through
one replica resolves through every replica, with the directory store and with Redis; a
handle is the uploader's tenant's only; the store down is a 503 naming it, and recovers."""

from __future__ import annotations

import base64
import io

import grpc
import pytest
import torch
from PIL import Image

from encoder_service.config import EncoderConfig
from encoder_service.server import EncoderServer
from encoder_service.towers.demo import DemoTower
from llm_service.encoder_client import EncoderClient
from llm_service.encoder_pool import PoolSettings
from llm_service.errors import NotFound, Unavailable
from mmserve.wire.media import MEDIA_STORE_UNAVAILABLE, TENANT_METADATA, MediaItem, MediaRef
from protos import common_pb2, encoder_pb2, encoder_pb2_grpc
from redis_server import REDIS_SERVER, RedisServer

REPLICAS = 3


def png(shade: int) -> bytes:
    image = Image.new("RGB", (96, 64), (shade, 90, 160))
    image.paste((255 - shade, 10, 40), (0, 0, 30, 64))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def tower() -> DemoTower:
    return DemoTower(hidden_size=576, dtype=torch.float32, seed=0)


@pytest.fixture(params=["directory", "redis"])
async def store(request, tmp_path):
    if request.param == "directory":
        yield {"media_store": "directory", "media_store_path": str(tmp_path)}, None
        return
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; CI does)")
    server = RedisServer(tmp_path)
    server.start()
    yield {"media_store": "redis", "media_store_url": server.url,
           "media_store_timeout_s": 0.5}, server
    server.stop()


@pytest.fixture
async def replicas(store, tower):
    settings, _ = store
    servers = [EncoderServer(EncoderConfig(host="127.0.0.1", port=0, max_tiles=2, **settings),
                             tower=tower) for _ in range(REPLICAS)]
    for server in servers:
        await server.start()
    yield servers
    for server in servers:
        await server.stop(grace=0)


async def encode_on(server: EncoderServer, url: str, tenant: str = "") -> encoder_pb2.ItemHeader:
    """One image through one replica's own port; its header."""
    metadata = ((TENANT_METADATA, tenant),) if tenant else ()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        request = encoder_pb2.EncodeRequest(request_id="t", items=[encoder_pb2.MediaItem(
            modality=common_pb2.MODALITY_IMAGE, ref=common_pb2.MediaRef(url=url))])
        responses = [r async for r in encoder_pb2_grpc.EncoderStub(channel).Encode(
            request, metadata=metadata)]
    return next(r.header for r in responses if r.HasField("header"))


def client_for(servers, affinity: bool = True) -> EncoderClient:
    return EncoderClient(",".join(f"127.0.0.1:{s.port}" for s in servers), budget_s=10,
                         pool=PoolSettings(affinity=affinity))


async def test_a_handle_uploaded_through_one_replica_resolves_through_all(replicas):
    uploaded = [await encode_on(replicas[0], data_url(png(shade))) for shade in range(0, 250, 50)]
    resolved = [await encode_on(server, header.handle)
                for header in uploaded for server in replicas]
    assert len(resolved) == 5 * REPLICAS  # every one a 200, none a 404
    by_handle = {h.handle: h.content_hash for h in uploaded}
    assert all(r.content_hash == by_handle[r.handle] for r in resolved)


async def test_affinity_sends_turn_2_to_the_replica_holding_its_embeddings(replicas):
    client = client_for(replicas)
    await client.start()
    try:
        images = [MediaItem(MediaRef(data=png(shade))) for shade in range(0, 250, 25)]
        first = [items[0] for items in await client.encode(images, "turn1")]
        again = [items[0] for items in await client.encode(images, "turn2")]
        handles = [MediaItem(MediaRef(url=item.handle)) for item in first]
        by_handle = [items[0] for items in await client.encode(handles, "turn2h")]
    finally:
        await client.close()
    assert not any(item.cached for item in first)
    assert all(item.cached for item in again + by_handle)  # 100% with affinity
    assert sum(1 for s in replicas if s.encoder.batcher.tower_calls) > 1  # spread over replicas


async def test_a_handle_resolves_only_for_the_tenant_that_uploaded_it(replicas):
    header = await encode_on(replicas[0], data_url(png(7)), tenant="aa" * 8)
    assert (await encode_on(replicas[2], header.handle, tenant="aa" * 8)).handle == header.handle
    for tenant in ("bb" * 8, ""):
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await encode_on(replicas[1], header.handle, tenant=tenant)
        assert other.value.code() == grpc.StatusCode.NOT_FOUND
        unknown_handle = "mm://sha256:" + "0" * 64
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await encode_on(replicas[1], unknown_handle, tenant=tenant)
        assert other.value.details().replace(header.handle, unknown_handle) == \
            unknown.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await encode_on(replicas[1], header.handle, tenant="not hex")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_store_down_fails_handles_with_a_503_naming_it_and_recovers(store, replicas):
    _, redis = store
    if redis is None:
        pytest.skip("the outage is simulated with the Redis store")
    client = client_for(replicas)
    await client.start()
    try:
        ((item,),) = await client.encode([MediaItem(MediaRef(data=png(1)))], "up")
        redis.stop()
        for server in replicas:  # on every replica a local miss now needs the store
            server.encoder.store._items.clear()
        with pytest.raises(Unavailable, match=f"^{MEDIA_STORE_UNAVAILABLE}: the Redis media "
                                              "store failed"):
            await client.encode([MediaItem(MediaRef(url=item.handle))], "down")
        # Media sent with the request still works, and the encoder stays in the pool.
        ((inline,),) = await client.encode([MediaItem(MediaRef(data=png(2)))], "inline")
        assert inline.num_tokens > 0 and client.pool.healthy
        redis.start()  # empty: the old handle is gone, new uploads work again
        with pytest.raises(NotFound):
            await client.encode([MediaItem(MediaRef(url=item.handle))], "lost")
        await encode_on(replicas[0], data_url(png(1)))
        for server in replicas:
            assert (await encode_on(server, item.handle)).handle == item.handle
    finally:
        await client.close()
