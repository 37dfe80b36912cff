"""The content store: a bounded LRU of encoded media, keyed by content hash.

Two kinds of entries share the byte budget: embeddings under their content hash, so a
repeated item skips the tower, and, for handles.py, the decoded source behind a handle (an
image, or the file bytes of an audio clip or a video), so a handle seen here skips decoding.
Only the event loop touches it, so it needs no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from PIL import Image

from mmserve.wire.media import Modality


@dataclass(frozen=True, slots=True)
class StoredItem:
    source: Image.Image | bytes  # the decoded image, or the audio / video file
    embeddings: torch.Tensor | None  # [num_tokens, hidden_size]; None for a video file
    num_tiles: int
    kind: Modality = Modality.IMAGE
    stored_at: float = 0.0  # time.monotonic() when a handle's source was last written out

    @property
    def nbytes(self) -> int:
        source = self.source
        if isinstance(source, Image.Image):
            size = source.width * source.height * len(source.getbands())
        else:
            size = len(source)
        if self.embeddings is not None:
            size += self.embeddings.numel() * self.embeddings.element_size()
        return size


class ContentStore:
    """LRU by bytes: the least recently used entries go first when over capacity."""

    def __init__(self, capacity_bytes: int) -> None:
        self._capacity = capacity_bytes
        self._items: OrderedDict[str, StoredItem] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, content_hash: str) -> bool:
        return content_hash in self._items

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, content_hash: str) -> StoredItem | None:
        """The entry, marked as recently used; counts a hit or a miss."""
        item = self._items.get(content_hash)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(content_hash)
        self.hits += 1
        return item

    def source(self, content_hash: str) -> StoredItem | None:
        """The entry behind a handle, marked as recently used, without counting a hit."""
        item = self._items.get(content_hash)
        if item is None:
            return None
        self._items.move_to_end(content_hash)
        return item

    def put(self, content_hash: str, item: StoredItem) -> None:
        """Stores an entry, evicting old ones; an entry larger than the store is not kept."""
        if item.nbytes > self._capacity:
            return
        old = self._items.pop(content_hash, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._items[content_hash] = item
        self._bytes += item.nbytes
        while self._bytes > self._capacity:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.nbytes
