"""The shared media store: each implementation bounds bytes, forgets after its TTL, refuses
corrupt or oversized entries before decoding, and turns a dead or slow store into a 503."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from encoder_service.cache import ContentStore
from encoder_service.errors import MediaNotFound
from encoder_service.handles import HandleStore
from encoder_service.media_store import (
    CorruptEntry,
    DirectoryMediaStore,
    MemoryMediaStore,
    RedisMediaStore,
    StoredSource,
    StoreUnavailable,
    encode_entry,
    entry_key,
)
from mmserve.wire.media import MEDIA_STORE_UNAVAILABLE, Modality, source_hash
from redis_server import RedisServer, needs_redis


def entry(data: bytes, kind: Modality = Modality.IMAGE,
          tenant: str = "") -> tuple[str, StoredSource]:
    return entry_key(tenant, source_hash(kind, data)), StoredSource(kind, data)


def stores(tmp_path):
    return {"memory": MemoryMediaStore(3000, ttl_s=60),
            "directory": DirectoryMediaStore(str(tmp_path), 3000, ttl_s=60,
                                             max_entry_bytes=2000, timeout_s=1)}


@pytest.mark.parametrize("kind", ["memory", "directory"])
async def test_round_trip_and_eviction_by_bytes(tmp_path, kind):
    store = stores(tmp_path)[kind]
    keys = []
    for k in range(4):  # 4 x 1000 bytes into 3000
        key, source = entry(bytes([k]) * 1000)
        await store.put(key, source)
        keys.append((key, source))
        if kind == "directory":
            os.utime(tmp_path / key, (time.time() - 10 + k, time.time() - 10 + k))
            store._next_sweep = 0.0  # sweep on every write here
    assert await store.get(keys[3][0]) == keys[3][1]
    assert await store.get(keys[0][0]) is None  # the oldest went first
    assert await store.get(entry(b"never")[0]) is None


async def test_entries_expire_after_the_ttl(tmp_path):
    memory = MemoryMediaStore(3000, ttl_s=0.05)
    directory = DirectoryMediaStore(str(tmp_path), 3000, ttl_s=60, max_entry_bytes=2000,
                                    timeout_s=1)
    key, source = entry(b"x" * 10)
    for store in (memory, directory):
        await store.put(key, source)
    os.utime(tmp_path / key, (time.time() - 61, time.time() - 61))
    await asyncio.sleep(0.06)
    assert await memory.get(key) is None
    assert await directory.get(key) is None and not (tmp_path / key).exists()


async def test_a_corrupt_or_oversized_stored_file_is_refused_and_dropped(tmp_path):
    store = DirectoryMediaStore(str(tmp_path), 1 << 20, ttl_s=60, max_entry_bytes=2000,
                                timeout_s=1)
    key, source = entry(b"a real png" * 10)
    (tmp_path / key).write_bytes(encode_entry(StoredSource(Modality.IMAGE, b"other bytes")))
    with pytest.raises(CorruptEntry, match="do not match the digest"):
        await store.get(key)
    assert not (tmp_path / key).exists()
    big_key, _ = entry(b"z" * 5000)
    (tmp_path / big_key).write_bytes(encode_entry(StoredSource(Modality.IMAGE, b"z" * 5000)))
    with pytest.raises(CorruptEntry, match="over the 2000-byte media limit"):
        await store.get(big_key)
    (tmp_path / key).write_bytes(b"GIF89a not ours")
    with pytest.raises(CorruptEntry, match="header"):
        await store.get(key)


async def test_a_handle_with_a_corrupt_entry_is_unknown_and_never_decoded(tmp_path):
    shared = DirectoryMediaStore(str(tmp_path), 1 << 20, ttl_s=60, max_entry_bytes=2000,
                                 timeout_s=1)
    handles = HandleStore(ContentStore(1 << 20), shared, ttl_s=60)
    key, _ = entry(b"png")
    (tmp_path / key).write_bytes(encode_entry(StoredSource(Modality.IMAGE, b"tampered")))
    decoded = []

    async def decode(data):
        decoded.append(data)
        return data

    with pytest.raises(MediaNotFound, match="unknown media handle"):
        await handles.recall("", key.rpartition(".")[2], Modality.IMAGE, decode)
    assert decoded == []


async def test_tenants_do_not_see_each_others_entries(tmp_path):
    handles = HandleStore(ContentStore(1 << 20), MemoryMediaStore(1 << 20, 60), ttl_s=60)
    digest = await handles.remember("aa", Modality.IMAGE, b"img", b"img")

    async def decode(data):
        return data

    assert await handles.recall("aa", digest, Modality.IMAGE, decode) == b"img"
    with pytest.raises(MediaNotFound) as other:
        await handles.recall("bb", digest, Modality.IMAGE, decode)
    with pytest.raises(MediaNotFound) as unknown:
        await handles.recall("bb", "0" * 64, Modality.IMAGE, decode)
    assert str(other.value).replace(digest, "0" * 64) == str(unknown.value)


class SlowStore(MemoryMediaStore):
    async def get(self, key):
        from encoder_service.media_store import _bounded

        return await _bounded("Redis media store", "somewhere", 0.05, asyncio.sleep(5))


async def test_a_slow_store_fails_handles_fast_and_uploads_still_work():
    handles = HandleStore(ContentStore(1 << 20), SlowStore(1 << 20, 60), ttl_s=60)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=f"^{MEDIA_STORE_UNAVAILABLE}: the Redis media "
                                               "store did not answer within 0.05 s"):
        await handles.recall("", "0" * 64, Modality.IMAGE, asyncio.sleep)
    assert time.monotonic() - started < 1


@needs_redis
async def test_redis_round_trip_refusal_and_outage(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    try:
        store = RedisMediaStore(server.url, ttl_s=60, max_entry_bytes=2000, timeout_s=0.5)
        key, source = entry(b"q" * 100, Modality.AUDIO, tenant="ab")
        await store.put(key, source)
        assert await store.get(key) == source
        big_key, _ = entry(b"z" * 5000)
        await store._redis.set(store._key(big_key),
                               encode_entry(StoredSource(Modality.IMAGE, b"z" * 5000)))
        with pytest.raises(CorruptEntry, match="over the 2000-byte media limit"):
            await store.get(big_key)
        assert await store._redis.exists(store._key(big_key)) == 0
        assert 0 < await store._redis.pttl(store._key(key)) <= 60_000
        server.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="Redis media store failed"):
            await store.get(key)
        assert time.monotonic() - started < 2
        server.start()
        await store.put(key, source)  # the same client reconnects
        assert await store.get(key) == source
        await store.close()
    finally:
        server.stop()
