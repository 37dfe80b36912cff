"""Placement over the encoder replicas: consistent hashing of content keys over the healthy
endpoints, rebalancing when one leaves, round-robin for new content."""

from __future__ import annotations

import base64

import grpc

from llm_service.encoder_pool import EncoderPool, PoolSettings
from mmserve.wire.media import MediaItem, MediaRef, Modality, routing_key, source_hash


def pool(n: int, affinity: bool = True) -> EncoderPool:
    def channel(address, options):
        return grpc.aio.insecure_channel(address)

    return EncoderPool(",".join(f"127.0.0.1:{6000 + k}" for k in range(n)), channel,
                       PoolSettings(affinity=affinity, eject_s=60))


KEYS = [source_hash(Modality.IMAGE, str(k).encode()) for k in range(600)]


async def test_keys_stick_to_one_endpoint_and_spread_evenly():
    p = pool(3)
    owners = {key: p.pick(key, set()).address for key in KEYS}
    assert owners == {key: p.pick(key, set()).address for key in KEYS}
    counts = sorted(list(owners.values()).count(a) for a in set(owners.values()))
    assert len(counts) == 3 and counts[0] > 120  # 200 each when even
    await p.close()


async def test_an_ejected_endpoint_moves_only_its_own_keys_and_gets_them_back():
    p = pool(3)
    before = {key: p.pick(key, set()).address for key in KEYS}
    gone = p.endpoints[1]
    p.eject(gone, "test")
    after = {key: p.pick(key, set()).address for key in KEYS}
    assert gone.address not in after.values()
    assert all(after[k] == before[k] for k in KEYS if before[k] != gone.address)
    gone.ejected_until = 0.0
    assert {key: p.pick(key, set()).address for key in KEYS} == before
    assert not gone.ejected.is_set()  # picked again: calls on it wait normally
    await p.close()


async def test_a_retry_goes_to_another_endpoint_and_none_when_all_are_out():
    p = pool(2)
    first = p.pick(KEYS[0], set())
    second = p.pick(KEYS[0], {first.address})
    assert second is not None and second.address != first.address
    assert p.pick(KEYS[0], {first.address, second.address}) is None
    for endpoint in p.endpoints:
        p.eject(endpoint, "test")
    assert p.pick(KEYS[0], set()) is None and p.pick(None, set()) is None
    assert not p.healthy and "down: ejected" in p.describe()
    await p.close()


async def test_new_content_and_no_affinity_spread_round_robin():
    p = pool(3)
    assert len({p.pick(None, set()).address for _ in range(3)}) == 3
    baseline = pool(3, affinity=False)
    assert len({baseline.pick(KEYS[0], set()).address for _ in range(3)}) == 3
    await p.close()
    await baseline.close()


def test_the_client_key_is_the_handle_the_encoder_mints():
    data = b"\x89PNG pretend"
    digest = source_hash(Modality.IMAGE, data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert routing_key(MediaItem(MediaRef(data=data))) == digest
    assert routing_key(MediaItem(MediaRef(url=url))) == digest
    assert routing_key(MediaItem(MediaRef(url=f"mm://sha256:{digest}"))) == digest
    assert routing_key(MediaItem(MediaRef(url="https://example.com/a.png"))) is None
    assert routing_key(MediaItem(MediaRef(data=data), Modality.AUDIO)) != digest
