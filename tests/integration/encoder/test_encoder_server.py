"""The real grpc.aio encoder server on port 0, called through the generated stubs."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import logging

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from encoder_service import healthcheck
from encoder_service.config import EncoderConfig
from encoder_service.server import SERVICE_NAME, EncoderServer
from encoder_service.towers.demo import DemoTower
from mmserve.wire.chunks import chunks_to_tensor
from protos import common_pb2, encoder_pb2, encoder_pb2_grpc

MIB = 1024 * 1024


def png_data_url(width: int, height: int, shade: int = 0) -> str:
    image = Image.new("RGB", (width, height), (shade, 90, 160))
    for x in range(0, width, 50):  # some structure, so tiles differ
        image.paste((x % 256, shade, 40), (x, 0, min(x + 25, width), height))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def url_item(url: str, **fields) -> encoder_pb2.MediaItem:
    return encoder_pb2.MediaItem(modality=common_pb2.MODALITY_IMAGE,
                                 ref=common_pb2.MediaRef(url=url), **fields)


@pytest.fixture(scope="module")
def demo_tower() -> DemoTower:
    return DemoTower(hidden_size=576, dtype=torch.float32, seed=0)


@pytest.fixture
async def server(demo_tower):
    server = EncoderServer(EncoderConfig(host="127.0.0.1", port=0), tower=demo_tower)
    await server.start()
    yield server
    await server.stop(grace=0)


@pytest.fixture
async def channel(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


async def encode(channel, *items, metadata=()):
    """(headers, tensors, responses) per item, reassembled with the shared wire helpers."""
    stub = encoder_pb2_grpc.EncoderStub(channel)
    responses = [r async for r in stub.Encode(
        encoder_pb2.EncodeRequest(request_id="test", items=items), metadata=metadata)]
    headers, chunks = {}, {}
    for response in responses:
        if response.HasField("header"):
            headers[response.item_index] = response.header
            chunks[response.item_index] = []
        else:
            chunks[response.item_index].append(response.chunk)
    tensors = [chunks_to_tensor(headers[i], chunks[i]) for i in sorted(headers)]
    return [headers[i] for i in sorted(headers)], tensors, responses


async def test_a_1000x600_image_is_7_tiles_and_1792_rows(channel):
    headers, tensors, responses = await encode(channel, url_item(png_data_url(1000, 600)))
    (header,) = headers
    assert (header.num_tokens, header.num_tiles, header.hidden_size) == (1792, 7, 576)
    assert header.dtype == common_pb2.DTYPE_FLOAT32 and len(header.content_hash) == 64
    assert tensors[0].shape == (1792, 576) and torch.isfinite(tensors[0]).all()
    assert len(responses) == 3  # header + 2 chunks of at most 3 MiB
    assert all(r.ByteSize() < 4 * MIB for r in responses)


async def test_the_same_image_twice_is_a_cache_hit_with_the_same_hash(channel, server):
    url = png_data_url(640, 480)
    (first,), (rows_first,), _ = await encode(channel, url_item(url))
    calls = server.encoder.batcher.tower_calls
    (second,), (rows_second,), _ = await encode(channel, url_item(url))
    assert second.content_hash == first.content_hash
    assert server.encoder.store.hits == 1 and server.encoder.batcher.tower_calls == calls
    assert torch.equal(rows_first, rows_second)
    (by_handle,), _, _ = await encode(channel, url_item(first.handle))
    assert by_handle.content_hash == first.content_hash and by_handle.cached


async def test_items_are_streamed_in_order(channel):
    headers, tensors, responses = await encode(
        channel, url_item(png_data_url(900, 300, shade=10)), url_item(png_data_url(448, 448)))
    assert [h.num_tiles for h in headers] == [4, 1]  # (3, 1) + thumbnail; (1, 1)
    assert [t.shape[0] for t in tensors] == [1024, 256]
    indices = [r.item_index for r in responses]
    assert indices == sorted(indices)


@pytest.mark.parametrize("item,code,message", [
    (url_item("data:image/png;base64,%%%"), grpc.StatusCode.INVALID_ARGUMENT, "not valid base64"),
    (url_item("mm://sha256:" + "0" * 64), grpc.StatusCode.NOT_FOUND, "unknown media handle"),
    (url_item("file:///etc/passwd"), grpc.StatusCode.PERMISSION_DENIED, "file:// URLs are off"),
    (url_item("http://127.0.0.1:9/a.png"), grpc.StatusCode.PERMISSION_DENIED, "non-public"),
    (url_item(png_data_url(10, 10), max_tiles=99), grpc.StatusCode.INVALID_ARGUMENT, "max_tiles"),
])
async def test_errors_map_to_status_codes_with_messages(channel, item, code, message):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await encode(channel, item)
    assert info.value.code() == code
    assert message in info.value.details()


async def test_unexpected_failures_are_internal_without_details(caplog):
    caplog.set_level(logging.INFO, logger="encoder_service.server")
    class BrokenTower(DemoTower):
        def encode(self, pixel_values):
            raise RuntimeError("secret tower state")

    broken = BrokenTower(hidden_size=576, dtype=torch.float32, seed=0)
    server = EncoderServer(EncoderConfig(host="127.0.0.1", port=0), tower=broken)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await encode(channel, url_item(png_data_url(448, 448)),
                             metadata=(("x-request-id", "req-broken"),))
    finally:
        await server.stop(grace=0)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in info.value.details() and "Traceback" not in info.value.details()
    assert "secret tower state" in caplog.text  # logged server-side instead
    assert "request_id=req-broken" in caplog.text and "status=INTERNAL" in caplog.text


async def test_one_log_line_per_request_with_the_metadata_request_id(channel, caplog):
    caplog.set_level(logging.INFO, logger="encoder_service.server")
    await encode(channel, url_item(png_data_url(448, 448)), metadata=(("x-request-id", "r-42"),))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rpc=Encode ")]
    assert len(lines) == 1
    assert "rpc=Encode request_id=r-42 status=OK ms=" in lines[0]
    assert lines[0].endswith(" items=1 tiles=1 cached=0 shm=no")


async def test_health_is_serving(channel, server):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # The probe script uses a blocking channel: run it off the loop that serves.
    assert await asyncio.to_thread(healthcheck.main, ["--address", f"127.0.0.1:{server.port}"]) == 0


async def test_healthcheck_fails_when_nothing_listens():
    healthy, status = await asyncio.to_thread(healthcheck.check, "127.0.0.1:9", "", 0.5)
    assert not healthy and status.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))


async def test_model_info(channel):
    info = await encoder_pb2_grpc.EncoderStub(channel).GetModelInfo(
        encoder_pb2.EncoderInfoRequest())
    assert (info.family, info.tower, info.hidden_size) == ("internvl2", "demo", 576)
    assert (info.tokens_per_tile, info.max_tiles) == (256, 12)
    assert info.dtype == common_pb2.DTYPE_FLOAT32
    assert list(info.modalities) == [common_pb2.MODALITY_IMAGE]


async def test_bfloat16_rows_on_the_wire():
    config = dataclasses.replace(EncoderConfig(host="127.0.0.1", port=0), dtype="bfloat16",
                                 hidden_size=96)
    server = EncoderServer(config)  # builds the demo tower from the config
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            (header,), (rows,), responses = await encode(channel, url_item(png_data_url(448, 448)))
    finally:
        await server.stop(grace=0)
    assert header.dtype == common_pb2.DTYPE_BFLOAT16 and header.hidden_size == 96
    assert rows.dtype == torch.bfloat16 and rows.shape == (256, 96)
    assert len(responses[1].chunk.data) == 256 * 96 * 2


async def test_an_image_above_the_default_grpc_message_size_is_accepted(channel):
    noise = Image.frombytes("RGB", (1400, 1400), torch.randint(0, 256, (1400 * 1400 * 3,),
                            dtype=torch.uint8).numpy().tobytes())
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    assert len(buffer.getvalue()) > 4 * MIB  # the data: URL alone is past gRPC's default
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    (header,), _, _ = await encode(channel, url_item(url, max_tiles=1))
    assert header.num_tiles == 1
