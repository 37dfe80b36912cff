"""The shared media store: what `mm://sha256:` handles stand for, visible to every replica.

An entry is the uploaded file (image, audio clip or video) and its modality, keyed by the
tenant and the handle's digest (`source_hash` of the modality and the bytes), so any encoder
replica can decode and encode it again. Embeddings are not kept here: they stay in each
replica's own LRU (cache.py).

Three implementations behind `MediaStore`, chosen by `media_store` in the config:
in-memory (one process; the default), a directory (a volume every replica mounts) and
Redis. Each is bounded by bytes and forgets entries after a TTL. An entry read back is
checked before anything decodes it: the magic, the size limit and the digest itself, so a
corrupt, truncated or oversized entry is refused, never decoded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

from encoder_service.errors import Unavailable
from mmserve.wire.media import MEDIA_STORE_UNAVAILABLE, Modality, source_hash

log = logging.getLogger(__name__)
MAGIC = b"MMS1"
HEADER_BYTES = len(MAGIC) + 1  # magic, then one byte of modality
T = TypeVar("T")


class StoreUnavailable(Unavailable):
    """The shared store cannot be reached in time; handles fail, inline media still works."""


class CorruptEntry(ValueError):
    """A stored entry that is not what its key says; it is dropped, never decoded."""


@dataclass(frozen=True, slots=True)
class StoredSource:
    """The file behind a handle: enough to encode the item again."""

    kind: Modality
    data: bytes


def entry_key(tenant: str, digest: str) -> str:
    """The key of a handle's entry: the tenant scopes it (`_` is the default tenant)."""
    return f"{tenant or '_'}.{digest}"


def encode_entry(source: StoredSource) -> bytes:
    return MAGIC + bytes([int(source.kind)]) + source.data


def decode_entry(key: str, blob: bytes, max_bytes: int) -> StoredSource:
    """The entry under `key`, checked: magic, modality, size and digest; else CorruptEntry."""
    if len(blob) > max_bytes + HEADER_BYTES:
        raise CorruptEntry(f"entry is over the {max_bytes}-byte media limit")
    if len(blob) < HEADER_BYTES or not blob.startswith(MAGIC):
        raise CorruptEntry("entry does not start with the store's header")
    try:
        kind = Modality(blob[len(MAGIC)])
    except ValueError:
        raise CorruptEntry(f"entry names unknown modality {blob[len(MAGIC)]}") from None
    data = blob[HEADER_BYTES:]
    if source_hash(kind, data) != key.rpartition(".")[2]:
        raise CorruptEntry("entry bytes do not match the digest of its handle")
    return StoredSource(kind, data)


class MediaStore(Protocol):
    """Where handles' files live. `get` and `put` raise StoreUnavailable when the store does
    not answer within its timeout; `get` drops a corrupt entry and returns None."""

    description: str  # names the kind of store in error messages: "Redis media store"
    address: str  # where it is, for the operator's log (never in a client's message)

    async def get(self, key: str) -> StoredSource | None: ...

    async def put(self, key: str, source: StoredSource) -> None: ...

    async def close(self) -> None: ...


class MemoryMediaStore:
    """One process's store: an LRU by bytes with a TTL (today's single-replica behaviour)."""

    def __init__(self, capacity_bytes: int, ttl_s: float) -> None:
        self.description = "in-memory media store"
        self.address = "this process"
        self._capacity, self._ttl = capacity_bytes, ttl_s
        self._items: OrderedDict[str, tuple[float, StoredSource]] = OrderedDict()
        self._bytes = 0

    async def get(self, key: str) -> StoredSource | None:
        entry = self._items.get(key)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return entry[1]

    async def put(self, key: str, source: StoredSource) -> None:
        if len(source.data) > self._capacity:
            return
        self._drop(key)
        self._items[key] = (time.monotonic() + self._ttl, source)
        self._bytes += len(source.data)
        while self._bytes > self._capacity:
            self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        entry = self._items.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[1].data)

    async def close(self) -> None:
        self._items.clear()
        self._bytes = 0


class DirectoryMediaStore:
    """Files in a directory every replica mounts (a shared volume). Writes are atomic
    (a temporary file renamed into place); the file's mtime is its upload time, for the
    TTL and for eviction (oldest first) when the directory is over capacity."""

    SWEEP_INTERVAL_S = 5.0

    def __init__(self, root: str, capacity_bytes: int, ttl_s: float, max_entry_bytes: int,
                 timeout_s: float) -> None:
        self.description = "directory media store"
        self.address = root
        self._root = Path(root)
        self._capacity, self._ttl = capacity_bytes, ttl_s
        self._max_entry, self._timeout = max_entry_bytes, timeout_s
        self._next_sweep = 0.0

    async def get(self, key: str) -> StoredSource | None:
        return await self._run(asyncio.to_thread(self._read, key))

    async def put(self, key: str, source: StoredSource) -> None:
        await self._run(asyncio.to_thread(self._write, key, encode_entry(source)))

    async def close(self) -> None:
        return None

    async def _run(self, operation: Awaitable[T]) -> T:
        return await _bounded(self.description, self.address, self._timeout, operation)

    def _read(self, key: str) -> StoredSource | None:
        path = self._root / key
        try:
            with path.open("rb") as file:
                info = os.fstat(file.fileno())
                if info.st_mtime + self._ttl < time.time():
                    path.unlink(missing_ok=True)
                    return None
                blob = file.read(self._max_entry + HEADER_BYTES + 1)
        except FileNotFoundError:
            return None
        try:
            return decode_entry(key, blob, self._max_entry)
        except CorruptEntry:
            path.unlink(missing_ok=True)
            raise

    def _write(self, key: str, blob: bytes) -> None:
        temporary = self._root / f".tmp-{uuid.uuid4().hex}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(blob)
            os.replace(temporary, self._root / key)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.SWEEP_INTERVAL_S
            self._sweep()

    def _sweep(self) -> None:
        """Removes expired entries, then the oldest ones while over capacity."""
        now, files = time.time(), []
        for entry in os.scandir(self._root):
            try:
                info = entry.stat()
            except FileNotFoundError:
                continue  # another replica removed it
            if info.st_mtime + self._ttl < now:
                Path(entry.path).unlink(missing_ok=True)
            else:
                files.append((info.st_mtime, info.st_size, entry.path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self._capacity:
                break
            Path(path).unlink(missing_ok=True)
            total -= size


class RedisMediaStore:
    """Entries as Redis strings with the TTL as their expiry. Redis bounds the bytes: run it
    with `maxmemory` and `maxmemory-policy allkeys-lru` (deploy/ does). A read asks for at
    most the media limit (GETRANGE), so an oversized entry never crosses the network whole."""

    def __init__(self, url: str, ttl_s: float, max_entry_bytes: int, timeout_s: float) -> None:
        parts = urlsplit(url)
        self.description = "Redis media store"
        self.address = f"{parts.hostname}:{parts.port or 6379}"  # never the password
        self._ttl_ms = int(ttl_s * 1000)
        self._max_entry, self._timeout = max_entry_bytes, timeout_s
        # Imported here: the redis package imports OpenTelemetry when that is installed, which
        # the other stores (and a service with tracing off) must not pay for.
        from redis.asyncio import Redis
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError
        from redis.retry import Retry

        self._errors: tuple[type[Exception], ...] = (OSError, RedisError)
        self._redis = Redis.from_url(url, socket_timeout=timeout_s,
                                     socket_connect_timeout=timeout_s,
                                     retry=Retry(NoBackoff(), 0))

    async def get(self, key: str) -> StoredSource | None:
        blob = await self._run(self._redis.getrange(self._key(key), 0,
                                                    self._max_entry + HEADER_BYTES))
        if not blob:
            return None
        if isinstance(blob, str):  # only with decode_responses, which this client never sets
            blob = blob.encode()
        try:
            return decode_entry(key, blob, self._max_entry)
        except CorruptEntry:
            await self._run(self._redis.delete(self._key(key)))
            raise

    async def put(self, key: str, source: StoredSource) -> None:
        await self._run(self._redis.set(self._key(key), encode_entry(source), px=self._ttl_ms))

    async def close(self) -> None:
        await self._redis.aclose()

    async def _run(self, operation: Awaitable[T]) -> T:
        return await _bounded(self.description, self.address, self._timeout, operation,
                              self._errors)

    @staticmethod
    def _key(key: str) -> str:
        return f"mmserve:media:{key}"


async def _bounded(description: str, address: str, timeout_s: float, operation: Awaitable[T],
                   errors: tuple[type[Exception], ...] = (OSError,)) -> T:
    """`operation` within the store's timeout; failures become StoreUnavailable (whose message
    the client sees: it names the kind of store, the log says where it is)."""
    try:
        return await asyncio.wait_for(operation, timeout_s)
    except (TimeoutError, asyncio.TimeoutError):
        log.warning("%s at %s did not answer within %g s", description, address, timeout_s)
        raise StoreUnavailable(f"{MEDIA_STORE_UNAVAILABLE}: the {description} did not answer "
                               f"within {timeout_s:g} s; media handles cannot be resolved "
                               f"until it does, so send the media itself") from None
    except errors as exc:
        log.warning("%s at %s failed: %s", description, address, exc)
        raise StoreUnavailable(f"{MEDIA_STORE_UNAVAILABLE}: the {description} failed "
                               f"({type(exc).__name__}); media handles cannot be resolved "
                               f"until it recovers, so send the media itself") from None


def build_media_store(kind: str, *, path: str, url: str, capacity_bytes: int, ttl_s: float,
                      max_entry_bytes: int, timeout_s: float) -> MediaStore:
    """The store the config names (see EncoderConfig.media_store)."""
    if kind == "directory":
        return DirectoryMediaStore(path, capacity_bytes, ttl_s, max_entry_bytes, timeout_s)
    if kind == "redis":
        return RedisMediaStore(url, ttl_s, max_entry_bytes, timeout_s)
    return MemoryMediaStore(capacity_bytes, ttl_s)
