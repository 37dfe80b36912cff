"""`mm://sha256:` handles: minted from uploaded bytes, resolved on any replica.

A handle is the server-issued `source_hash` of the modality and the file bytes. Uploading
media records it twice: decoded, in this replica's LRU (a handle seen here skips decoding),
and as the file, in the shared media store under the uploader's tenant, so every replica
resolves it. A local miss loads the file from the store and decodes it again under the same
limits as an upload. A handle another tenant uploaded is, to this one, an unknown handle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from PIL import Image

from encoder_service.cache import ContentStore, StoredItem
from encoder_service.errors import InvalidMedia, MediaNotFound
from encoder_service.media_store import (
    CorruptEntry,
    MediaStore,
    StoredSource,
    StoreUnavailable,
    entry_key,
)
from mmserve.wire.media import Modality, handle_for, source_hash

log = logging.getLogger(__name__)

Source = Image.Image | bytes  # a decoded image, or an audio / video file
_LOCAL_PREFIX = "src:"  # local LRU keys of handle sources (embeddings use content hashes)


class HandleStore:
    """Records uploaded media under its handle and finds it again by handle."""

    def __init__(self, local: ContentStore, shared: MediaStore, ttl_s: float) -> None:
        self._local = local
        self.shared = shared
        # Re-written to the shared store after half its TTL, so a handle in use stays valid.
        self._refresh_s = ttl_s / 2
        self.store_errors = 0

    async def remember(self, tenant: str, kind: Modality, data: bytes, decoded: Source) -> str:
        """The digest of the handle for `data`; stores it unless stored recently. A store that
        is down costs only the handle's reach: the request that carried the media goes on."""
        digest = await asyncio.to_thread(source_hash, kind, data)
        key = entry_key(tenant, digest)
        now = time.monotonic()
        known = self._local.source(_LOCAL_PREFIX + key)
        if known is not None and now < known.stored_at + self._refresh_s:
            return digest
        self._local.put(_LOCAL_PREFIX + key, StoredItem(decoded, None, 0, kind, stored_at=now))
        try:
            await self.shared.put(key, StoredSource(kind, data))
        except StoreUnavailable as exc:
            self.store_errors += 1
            log.warning("handle %s is known to this replica only: %s", handle_for(digest), exc)
        return digest

    async def recall(self, tenant: str, digest: str, kind: Modality,
                     decode: Callable[[bytes], Awaitable[Source]]) -> Source:
        """What handle `digest` stands for, decoded with `decode` when it came from the shared
        store; MediaNotFound when this tenant never uploaded it (or it expired)."""
        key = entry_key(tenant, digest)
        item = self._local.source(_LOCAL_PREFIX + key)
        if item is not None:
            _check_kind(digest, item.kind, kind)
            return item.source
        try:
            stored = await self.shared.get(key)
        except CorruptEntry as exc:
            log.error("refused the stored entry of %s in the %s (dropped): %s",
                      handle_for(digest), self.shared.description, exc)
            stored = None
        if stored is None:
            raise MediaNotFound(f"unknown media handle {handle_for(digest)}; it was never seen "
                                f"or has expired, so send the {kind.label} itself again")
        _check_kind(digest, stored.kind, kind)
        decoded = await decode(stored.data)
        self._local.put(_LOCAL_PREFIX + key,
                        StoredItem(decoded, None, 0, kind, stored_at=time.monotonic()))
        return decoded


def _check_kind(digest: str, stored: Modality, wanted: Modality) -> None:
    if stored != wanted:
        raise InvalidMedia(f"media handle {handle_for(digest)} names {_article(stored.label)} "
                           f"{stored.label}, but it was sent as {_article(wanted.label)} "
                           f"{wanted.label} part")


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"
