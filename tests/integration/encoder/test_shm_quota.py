"""A caller that offers shared memory and never reads: the encoder's quota, file modes and
sweeps keep the shared directory bounded (issue 13, gap 1)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import grpc
import pytest

from mmserve.wire.shm import create_probe, remove_probe
from polling import eventually
from protos import encoder_pb2, encoder_pb2_grpc
from test_shm_encode import HIDDEN, pb_item, regions_in, start_encoder

REGION_BYTES = 256 * HIDDEN * 4  # one demo tile of float32 rows


@pytest.fixture
def shm(tmp_path):
    directory = tmp_path / "shm"
    directory.mkdir()
    return directory


async def flood(port: int, offer: encoder_pb2.ShmOffer, calls: int) -> list[str]:
    """`calls` Encode calls whose regions are never read; each call's second part kind."""
    kinds = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        for k in range(calls):
            request = encoder_pb2.EncodeRequest(request_id=f"f{k}", items=[pb_item(k)], shm=offer)
            responses = [r async for r in stub.Encode(request)]
            kinds.append(responses[1].WhichOneof("part"))
    return kinds


async def test_unread_regions_are_bounded_by_the_quota_and_private(shm):
    server = await start_encoder(shm, shm_quota_bytes=3 * REGION_BYTES, shm_stale_s=60)
    offer = create_probe(str(shm))
    try:
        kinds = await flood(server.port, offer, 10)
    finally:
        await server.stop(grace=0)
        remove_probe(offer)
    assert kinds == ["shm"] * 3 + ["chunk"] * 7  # over the quota: in-band
    names = regions_in(shm)
    assert len(names) == 3
    assert {stat.S_IMODE((shm / n).stat().st_mode) for n in names} == {0o600}


async def test_the_probe_is_private(shm):
    offer = create_probe(str(shm))
    try:
        assert stat.S_IMODE((shm / offer.probe_name).stat().st_mode) == 0o600
    finally:
        remove_probe(offer)


async def test_unread_regions_are_swept_soon_and_the_quota_comes_back(shm):
    server = await start_encoder(shm, shm_quota_bytes=2 * REGION_BYTES, shm_stale_s=0.3)
    offer = create_probe(str(shm))
    try:
        assert await flood(server.port, offer, 3) == ["shm", "shm", "chunk"]
        await eventually(lambda: not regions_in(shm), 5, "unread regions were not swept")
        assert await flood(server.port, offer, 1) == ["shm"]
    finally:
        await server.stop(grace=0)
        remove_probe(offer)


def dead_callers_probe(directory: str) -> str:
    """A probe made by a process then killed with SIGKILL: nothing of it ran at exit."""
    script = ("import os, signal, sys; from mmserve.wire.shm import create_probe; "
              "print(create_probe(sys.argv[1]).probe_name, flush=True); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", script, directory], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == -9, done.stderr
    return done.stdout.strip()


async def test_a_dead_callers_probe_is_removed_and_a_live_one_kept(shm):
    dead = dead_callers_probe(str(shm))
    assert (shm / dead).exists()
    past = time.time() - 60
    os.utime(shm / dead, (past, past))  # older than the grace a new probe gets
    live = create_probe(str(shm))
    os.utime(shm / live.probe_name, (past, past))
    server = await start_encoder(shm, shm_stale_s=0.2)
    try:
        await eventually(lambda: not (shm / dead).exists(), 5, "the dead probe stayed")
        assert (shm / live.probe_name).exists()
    finally:
        await server.stop(grace=0)
        remove_probe(live)
