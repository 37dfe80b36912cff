"""Same-host transfer through a shared directory (a tmp_path here), end to end: the real
encoder server, the LLM service's EncoderClient, and raw stubs for the protocol edges."""

from __future__ import annotations

import base64
import io
import logging
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

import llm_service.encoder_client as encoder_client
from encoder_service.config import EncoderConfig
from encoder_service.server import EncoderServer
from encoder_service.towers.demo import DemoTower
from llm_service.encoder_client import EncoderClient
from llm_service.errors import Unavailable
from mmserve.wire.chunks import chunks_to_tensor, dtype_to_pb
from mmserve.wire.media import MediaItem, MediaRef
from mmserve.wire.shm import create_probe
from protos import common_pb2, encoder_pb2, encoder_pb2_grpc
from polling import eventually

HIDDEN = 576


def png_data_url(width: int = 448, height: int = 448, shade: int = 0) -> str:
    image = Image.new("RGB", (width, height), (shade, 90, 160))
    for x in range(0, width, 50):
        image.paste((x % 256, shade, 40), (x, 0, min(x + 25, width), height))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image(shade: int = 0, width: int = 448) -> MediaItem:
    return MediaItem(MediaRef(url=png_data_url(width, 448, shade)))


def pb_item(shade: int = 0) -> encoder_pb2.MediaItem:
    return encoder_pb2.MediaItem(modality=common_pb2.MODALITY_IMAGE,
                                 ref=common_pb2.MediaRef(url=png_data_url(shade=shade)))


def regions_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("mmserve-emb-"))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = torch.int32 if a.element_size() == 4 else torch.int16
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints), b.view(ints))


async def start_encoder(shm_dir: Path | str, tower=None, **fields) -> EncoderServer:
    tower = tower or DemoTower(hidden_size=fields.get("hidden_size", HIDDEN),
                               dtype=torch.float32, seed=0)
    server = EncoderServer(EncoderConfig(host="127.0.0.1", port=0, shm_dir=str(shm_dir),
                                         **fields), tower=tower)
    await server.start()
    return server


@pytest.fixture
def shm(tmp_path) -> Path:
    directory = tmp_path / "shm"
    directory.mkdir()
    return directory


@pytest.fixture
def taken(monkeypatch) -> list[str]:
    """Names of the regions the EncoderClient read."""
    names: list[str] = []
    real = encoder_client.read_region

    def spy(directory, header, region):
        names.append(region.name)
        return real(directory, header, region)

    monkeypatch.setattr(encoder_client, "read_region", spy)
    return names


async def raw_encode(port: int, *items, offer: encoder_pb2.ShmOffer | None = None):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = encoder_pb2.EncodeRequest(request_id="raw", items=items, shm=offer)
        return [r async for r in encoder_pb2_grpc.EncoderStub(channel).Encode(request)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
async def test_shared_memory_and_in_band_rows_are_bit_identical(shm, taken, dtype):
    server = await start_encoder(shm, DemoTower(hidden_size=HIDDEN, dtype=dtype, seed=0))
    address = f"127.0.0.1:{server.port}"
    same_host, in_band = EncoderClient(address, shm_dir=str(shm)), EncoderClient(address)
    try:
        items = [image(10, width=900), image(200)]
        via_shm = [i for items in await same_host.encode(items, "shm") for i in items]
        via_grpc = [i for items in await in_band.encode(items, "grpc") for i in items]
        assert len(taken) == 2  # both items came through files
        probes = [p.name for p in shm.iterdir()]
        assert len(probes) == 1 and probes[0].startswith("mmserve-probe-")
    finally:
        await same_host.close()
        await in_band.close()
        await server.stop(grace=0)
    assert [i.embeddings.shape for i in via_shm] == [(768, HIDDEN), (256, HIDDEN)]
    for a, b in zip(via_shm, via_grpc):
        assert a.embeddings.dtype == dtype and same_bits(a.embeddings, b.embeddings)
        assert (a.content_hash, a.num_tiles) == (b.content_hash, b.num_tiles)
    assert not torch.equal(via_shm[0].embeddings[:256], via_shm[1].embeddings)
    assert list(shm.iterdir()) == []  # regions taken, probe removed on close


async def test_the_protocol_sends_a_header_then_one_region_per_item(shm):
    server = await start_encoder(shm)
    try:
        offer = create_probe(str(shm))
        responses = await raw_encode(server.port, pb_item(1), pb_item(2), offer=offer)
        in_band = await raw_encode(server.port, pb_item(1), pb_item(2))
    finally:
        await server.stop(grace=0)
    assert [(r.item_index, r.WhichOneof("part")) for r in responses] == \
        [(0, "header"), (0, "shm"), (1, "header"), (1, "shm")]
    assert all(r.shm.nbytes == 256 * HIDDEN * 4 for r in responses[1::2])
    assert regions_in(shm) == sorted(r.shm.name for r in responses[1::2])
    header, region = responses[0].header, responses[1].shm
    rows = torch.from_numpy(np.fromfile(shm / region.name, dtype="<f4")).reshape(256, HIDDEN)
    assert same_bits(rows, chunks_to_tensor(in_band[0].header, [in_band[1].chunk]))
    assert header.content_hash == in_band[0].header.content_hash


@pytest.mark.parametrize("case", ["wrong token", "wrong dir", "bad name", "encoder off"])
async def test_offers_that_do_not_hold_fall_back_to_in_band(tmp_path, shm, case):
    other = tmp_path / "other"
    other.mkdir()
    offer = create_probe(str(shm))
    if case == "wrong token":
        offer.probe_token = bytes(16)
    elif case == "wrong dir":
        offer = create_probe(str(other))
    elif case == "bad name":
        (shm / "x").write_bytes(offer.probe_token)
        offer.probe_name = "../shm/x"
    server = await start_encoder("" if case == "encoder off" else shm)
    try:
        responses = await raw_encode(server.port, pb_item(), offer=offer)
    finally:
        await server.stop(grace=0)
    assert [r.WhichOneof("part") for r in responses] == ["header", "chunk"]
    rows = chunks_to_tensor(responses[0].header, [responses[1].chunk])
    assert rows.shape == (256, HIDDEN) and torch.isfinite(rows).all()
    assert regions_in(shm) == [] and regions_in(other) == []


async def test_small_items_stay_in_band_under_an_accepted_offer(shm, taken, caplog):
    caplog.set_level(logging.INFO, logger="encoder_service.server")
    server = await start_encoder(shm, DemoTower(hidden_size=64, dtype=torch.float16, seed=0),
                                 hidden_size=64)
    address = f"127.0.0.1:{server.port}"
    try:
        small = EncoderClient(address, shm_dir=str(shm))
        ((item,),) = await small.encode([image()], "small")  # 256 x 64 x 2 = 32 KiB
        await small.close()
        offer = create_probe(str(shm))
        responses = await raw_encode(server.port, pb_item(), offer=offer)
    finally:
        await server.stop(grace=0)
    assert taken == [] and item.embeddings.shape == (256, 64)
    assert caplog.text.count("status=OK") == 2 and caplog.text.count("shm=yes") == 2
    assert [r.WhichOneof("part") for r in responses] == ["header", "chunk"]
    assert same_bits(item.embeddings, chunks_to_tensor(responses[0].header, [responses[1].chunk]))


async def test_a_client_without_a_writable_directory_uses_in_band(tmp_path, taken):
    server = await start_encoder(tmp_path)
    client = EncoderClient(f"127.0.0.1:{server.port}", shm_dir=str(tmp_path / "missing"))
    try:
        ((item,),) = await client.encode([image()], "r")
    finally:
        await client.close()
        await server.stop(grace=0)
    assert taken == [] and item.embeddings.shape == (256, HIDDEN)


class _ScriptedEncoder(encoder_pb2_grpc.EncoderServicer):
    """Answers every Encode with a header and the given region."""

    def __init__(self, region: encoder_pb2.ShmRegion) -> None:
        self.region = region
        self.offers: list[encoder_pb2.ShmOffer] = []

    async def Encode(self, request, context):
        self.offers.append(request.shm)
        header = encoder_pb2.ItemHeader(num_tokens=1, hidden_size=2,
                                        dtype=dtype_to_pb(torch.float32), num_tiles=1)
        yield encoder_pb2.EncodeResponse(item_index=0, header=header)
        yield encoder_pb2.EncodeResponse(item_index=0, shm=self.region)


async def scripted(region: encoder_pb2.ShmRegion, shm_dir: Path | None):
    servicer = _ScriptedEncoder(region)
    server = grpc.aio.server()
    encoder_pb2_grpc.add_EncoderServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = EncoderClient(f"127.0.0.1:{port}", shm_dir=str(shm_dir) if shm_dir else None)
    try:
        with pytest.raises(Unavailable) as info:
            await client.encode([image()], "evil")
    finally:
        await client.close()
        await server.stop(0)
    return str(info.value), servicer.offers


@pytest.mark.parametrize("name", ["../victim", "/tmp/victim", "mmserve-emb-../../victim"])
async def test_the_client_refuses_a_malicious_region_name(tmp_path, shm, name):
    victim = tmp_path / "victim"
    victim.write_bytes(b"\0" * 8)
    message, offers = await scripted(encoder_pb2.ShmRegion(name=name, nbytes=8), shm)
    assert "refusing shared-memory region name" in message and repr(name) in message
    assert offers[0].dir == str(shm) and offers[0].probe_name.startswith("mmserve-probe-")
    assert victim.read_bytes() == b"\0" * 8


async def test_the_client_refuses_a_region_it_did_not_offer():
    message, offers = await scripted(
        encoder_pb2.ShmRegion(name="mmserve-emb-" + "0" * 32, nbytes=8), None)
    assert "although none was offered" in message and not offers[0].dir


async def test_a_missing_or_wrongly_sized_region_is_unavailable_and_removed(shm):
    name = "mmserve-emb-" + "a" * 32
    message, _ = await scripted(encoder_pb2.ShmRegion(name=name, nbytes=8), shm)
    assert f"cannot read embedding rows from shared-memory region {name!r}" in message
    assert "No such file" in message
    (shm / name).write_bytes(b"\0" * 12)
    message, _ = await scripted(encoder_pb2.ShmRegion(name=name, nbytes=12), shm)
    assert "region has 12 bytes, the header says 1 x 2 x 4 = 8" in message
    assert regions_in(shm) == []


class _GatedTower(DemoTower):
    """Each call waits for `gate` (open at first), then fails if `fail` is set."""

    def __init__(self) -> None:
        super().__init__(hidden_size=HIDDEN, dtype=torch.float32, seed=0)
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def encode(self, pixel_values):
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("tower broke")
        return super().encode(pixel_values)


async def first_region(call) -> str:
    header, region = await call.read(), await call.read()
    assert (header.WhichOneof("part"), region.WhichOneof("part")) == ("header", "shm")
    return region.shm.name


@pytest.mark.parametrize("ending", ["cancelled", "failed"])
async def test_a_call_that_does_not_finish_leaves_no_region_behind(shm, ending):
    tower = _GatedTower()
    server = await start_encoder(shm, tower, max_batch_tiles=1)
    try:
        await raw_encode(server.port, pb_item(1))  # stored: the first item needs no tower
        tower.gate.clear()
        tower.fail = ending == "failed"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            request = encoder_pb2.EncodeRequest(request_id="c", items=[pb_item(1), pb_item(2)],
                                                shm=create_probe(str(shm)))
            call = encoder_pb2_grpc.EncoderStub(channel).Encode(request)
            name = await first_region(call)
            assert regions_in(shm) == [name]  # written, not taken
            if ending == "cancelled":
                call.cancel()
            else:
                tower.gate.set()
                assert await call.code() == grpc.StatusCode.INTERNAL
            await eventually(lambda: not regions_in(shm), 2, "the region was not removed")
        assert regions_in(shm) == []
    finally:
        tower.gate.set()
        await server.stop(grace=0)
