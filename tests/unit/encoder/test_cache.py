"""The content store: LRU by bytes, hit accounting, handle lookups."""

from __future__ import annotations

import torch
from PIL import Image

from encoder_service.cache import ContentStore, StoredItem


def item(rows: int = 10, side: int = 10) -> StoredItem:
    # 10x10 RGB = 300 bytes + rows x 10 float32 = 40 bytes per row
    return StoredItem(Image.new("RGB", (side, side)), torch.zeros(rows, 10), num_tiles=1)


def test_nbytes_counts_pixels_and_embeddings():
    assert item(rows=10).nbytes == 300 + 400


def test_least_recently_used_entries_are_evicted_first():
    store = ContentStore(capacity_bytes=3 * 700)
    for key in "abc":
        store.put(key, item())
    assert store.get("a") is not None  # "b" is now the oldest
    store.put("d", item())
    assert "b" not in store and {"a", "c", "d"} <= {k for k in "abcd" if k in store}
    assert store.nbytes == 3 * 700


def test_handle_lookup_refreshes_recency_without_counting_a_hit():
    store = ContentStore(capacity_bytes=2 * 700)
    store.put("a", item())
    store.put("b", item())
    assert store.source("a").source is not None
    store.put("c", item())
    assert "a" in store and "b" not in store
    assert (store.hits, store.misses) == (0, 0)


def test_hits_and_misses_are_counted():
    store = ContentStore(capacity_bytes=10_000)
    store.put("a", item())
    assert store.get("a") is not None and store.get("zz") is None
    assert (store.hits, store.misses) == (1, 1)


def test_an_entry_larger_than_the_store_is_not_kept():
    store = ContentStore(capacity_bytes=500)
    store.put("big", item())
    assert len(store) == 0 and store.nbytes == 0


def test_replacing_a_key_keeps_the_byte_count_right():
    store = ContentStore(capacity_bytes=10_000)
    store.put("a", item(rows=10))
    store.put("a", item(rows=20))
    assert len(store) == 1 and store.nbytes == 300 + 800
