"""The encoding pipeline: media reference -> image -> tiles -> tower -> embedding rows.

This is the interface the gRPC servicer calls; it knows nothing about protobuf.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch

from encoder_service.batcher import TileBatcher
from encoder_service.cache import ContentStore, StoredItem
from encoder_service.config import EncoderConfig
from encoder_service.errors import InvalidRequest
from encoder_service.families.internvl import FAMILY, InternVL2Preprocessor
from encoder_service.media import MediaRef, MediaResolver
from encoder_service.towers.base import Tower

MODALITIES = ("image",)


@dataclass(frozen=True, slots=True)
class MediaItem:
    ref: MediaRef
    modality: str = "image"
    max_tiles: int = 0  # 0: the configured default


@dataclass(frozen=True, slots=True)
class EncodedItem:
    embeddings: torch.Tensor  # [num_tokens, hidden_size] in the configured dtype
    num_tiles: int
    content_hash: str
    cached: bool  # served from the content store, without running the tower

    @property
    def num_tokens(self) -> int:
        return self.embeddings.shape[0]


class Encoder:
    """Resolves, preprocesses and encodes media items, reusing stored results."""

    def __init__(self, config: EncoderConfig, tower: Tower) -> None:
        self.config = config
        self.preprocessor = InternVL2Preprocessor(config.image_size, config.use_thumbnail)
        if tower.hidden_size != config.hidden_size:
            raise ValueError(f"tower output width {tower.hidden_size} != configured "
                             f"hidden_size {config.hidden_size}")
        if tower.tokens_per_tile != self.preprocessor.tokens_per_tile:
            raise ValueError(f"tower gives {tower.tokens_per_tile} rows per tile, {FAMILY} "
                             f"preprocessing expects {self.preprocessor.tokens_per_tile}")
        self.tower = tower
        self.store = ContentStore(config.cache_capacity_bytes)
        self.resolver = MediaResolver(config, self.store)
        self.batcher = TileBatcher(tower, config.max_batch_tiles)

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    async def encode_all(self, items: Sequence[MediaItem]) -> AsyncIterator[EncodedItem]:
        """Encodes all items concurrently and yields the results in request order.

        The first failure (in request order) is raised; the other items are cancelled.
        """
        if not items:
            raise InvalidRequest("the request has no media items")
        if len(items) > self.config.max_items_per_request:
            raise InvalidRequest(f"the request has {len(items)} media items; the limit is "
                                 f"{self.config.max_items_per_request} per request")
        tasks = [asyncio.create_task(self.encode(item)) for item in items]
        try:
            for task in tasks:
                yield await task
        finally:
            for task in tasks:
                task.cancel()
            # Collects what the cancelled or failed tasks raised, so nothing is left unretrieved.
            await asyncio.gather(*tasks, return_exceptions=True)

    async def encode(self, item: MediaItem) -> EncodedItem:
        """One item's embedding rows, from the store when this content was seen before."""
        if item.modality not in MODALITIES:
            raise InvalidRequest(f"this encoder ({FAMILY}) encodes {', '.join(MODALITIES)} only, "
                                 f"got a {item.modality} item")
        max_tiles = item.max_tiles or self.config.max_tiles
        if max_tiles > self.config.max_tiles:
            raise InvalidRequest(f"max_tiles {item.max_tiles} exceeds this encoder's limit of "
                                 f"{self.config.max_tiles}; send 0 for the default")
        image = await self.resolver.load_image(item.ref)
        key = await asyncio.to_thread(self.preprocessor.content_hash, image, max_tiles)
        stored = self.store.get(key)
        if stored is not None:
            return EncodedItem(stored.embeddings, stored.num_tiles, key, cached=True)
        prepared = await asyncio.to_thread(self.preprocessor.preprocess, image, max_tiles)
        tiles = await self.batcher.encode(prepared.pixel_values)
        rows = tiles.reshape(-1, tiles.shape[-1])
        self.store.put(key, StoredItem(image, rows, prepared.num_tiles))
        return EncodedItem(rows, prepared.num_tiles, key, cached=False)
