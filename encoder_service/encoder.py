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
from encoder_service.config import MAX_VIDEO_FRAMES, EncoderConfig
from encoder_service.errors import InvalidRequest
from encoder_service.families import build_preprocessor
from encoder_service.media import MediaRef, MediaResolver
from encoder_service.towers.base import Tower
from encoder_service.video import frames_content_hash, frames_to_pixel_values, sample_frames


@dataclass(frozen=True, slots=True)
class MediaItem:
    ref: MediaRef
    modality: str = "image"
    max_tiles: int = 0  # 0: the configured default
    num_frames: int = 0  # video only: frames to sample; 0: the configured default


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
        self.preprocessor = build_preprocessor(config)
        if tower.hidden_size != config.hidden_size:
            raise ValueError(f"tower output width {tower.hidden_size} != configured "
                             f"hidden_size {config.hidden_size}")
        if tower.tokens_per_tile != self.preprocessor.tokens_per_tile:
            raise ValueError(f"tower gives {tower.tokens_per_tile} rows per tile, "
                             f"{self.preprocessor.family} "
                             f"preprocessing expects {self.preprocessor.tokens_per_tile}")
        self.tower = tower
        self.store = ContentStore(config.cache_capacity_bytes)
        self.resolver = MediaResolver(config, self.store)
        self.batcher = TileBatcher(tower, config.max_batch_tiles)
        # Towers with fixed-size tiles whose rows are merged per item afterwards (LLaVA's
        # anyres) batch their tiles like the others; towers that take a whole item
        # (variable-size slices, audio) bypass the tile batcher and run one item at a time.
        self._merge_item = getattr(tower, "merge_item", None)
        self._encode_item = None if self._merge_item else getattr(tower, "encode_item", None)
        self._item_lock = asyncio.Lock()

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
        modalities = self.preprocessor.modalities
        video = getattr(self.preprocessor, "samples_video", False)
        if item.modality == "video" and video:
            return await self._encode_video(item)
        if item.modality not in modalities:
            raise InvalidRequest(f"this encoder ({self.preprocessor.family}) encodes "
                                 f"{', '.join(modalities)} only, got a {item.modality} item"
                                 + ("; video files are sampled into image frames" if video else ""))
        max_tiles = item.max_tiles or self.config.max_tiles
        if max_tiles > self.config.max_tiles:
            raise InvalidRequest(f"max_tiles {item.max_tiles} exceeds this encoder's limit of "
                                 f"{self.config.max_tiles}; send 0 for the default")
        if item.modality == "audio":
            return await self._encode_audio(item)
        image = await self.resolver.load_image(item.ref)
        key = await asyncio.to_thread(self.preprocessor.content_hash, image, max_tiles)
        return await self._stored_or_encoded(key, image, "image", self.preprocessor.preprocess,
                                             image, max_tiles)

    async def _encode_audio(self, item: MediaItem) -> EncodedItem:
        """Audio is decoded to 16 kHz samples, hashed and encoded as one item; the store
        keeps the file, so its handle can stand in for it later."""
        data = await self.resolver.load_audio_bytes(item.ref)
        samples = await asyncio.to_thread(self.preprocessor.decode_audio, data)
        key = await asyncio.to_thread(self.preprocessor.content_hash, samples, 0)
        return await self._stored_or_encoded(key, data, "audio", self.preprocessor.preprocess,
                                             samples, 0)

    async def _encode_video(self, item: MediaItem) -> EncodedItem:
        """Frames sampled by InternVL's rule, one tile each; the rows of all frames come back
        as one item with num_tiles = frames. The store keeps the file, so its handle can be
        sampled again, into any number of frames."""
        num_frames = item.num_frames or self.config.video_frames
        if num_frames > MAX_VIDEO_FRAMES:
            raise InvalidRequest(f"num_frames {num_frames} exceeds the limit of "
                                 f"{MAX_VIDEO_FRAMES}; send 0 for the default")
        data = await self.resolver.load_video_bytes(item.ref)
        frames = await asyncio.to_thread(sample_frames, data, num_frames,
                                         self.config.max_image_pixels)
        key = await asyncio.to_thread(frames_content_hash, frames, self.preprocessor)
        return await self._stored_or_encoded(key, data, "video", frames_to_pixel_values,
                                             frames, self.preprocessor)

    async def _stored_or_encoded(self, key: str, source, kind: str, preprocess,
                                 *args) -> EncodedItem:
        """The stored rows under `key`, or `preprocess(*args)` run through the tower and
        stored with `source` (what re-encoding the item needs)."""
        stored = self.store.get(key)
        if stored is not None:
            return EncodedItem(stored.embeddings, stored.num_tiles, key, cached=True)
        prepared = await asyncio.to_thread(preprocess, *args)
        rows = await self._run_tower(prepared)
        self.store.put(key, StoredItem(source, rows, prepared.num_tiles, kind=kind))
        return EncodedItem(rows, prepared.num_tiles, key, cached=False)

    async def _run_tower(self, prepared) -> torch.Tensor:
        """[num_tokens, hidden] rows of one preprocessed item."""
        if self._encode_item is not None:
            async with self._item_lock:
                return await asyncio.to_thread(self._encode_item, prepared)
        tiles = await self.batcher.encode(prepared.pixel_values)
        if self._merge_item is not None:
            return await asyncio.to_thread(self._merge_item, tiles, prepared)
        return tiles.reshape(-1, tiles.shape[-1])
