"""The encoding pipeline: media reference -> image (audio, frames) -> tower -> embedding rows.

This is the interface the gRPC servicer calls; it knows nothing about protobuf. Each image
or audio item becomes one `EncodedItem`; a video becomes one per frame, each with its own
content hash, so a frame seen before (in a frame list, or sampled again) skips the tower.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from encoder_service.batcher import TileBatcher
from encoder_service.cache import ContentStore, StoredItem
from encoder_service.config import MAX_VIDEO_FRAMES, EncoderConfig
from encoder_service.errors import InvalidRequest
from encoder_service.families import Preprocessed, Preprocessor, Tiles, build_preprocessor
from encoder_service.handles import HandleStore
from encoder_service.media import MediaResolver
from encoder_service.media_store import build_media_store
from encoder_service.pixel_budget import PixelBudget, pixel_bytes
from encoder_service.stages import stage
from encoder_service.towers.base import Tower
from encoder_service.video import sample_frames
from mmserve.tracing import span
from mmserve.wire.media import EncodedItem, MediaItem, Modality, handle_for

@dataclass(frozen=True, slots=True)
class ItemEstimate:
    """What one request item will cost, known from its header before decoding."""

    num_tokens: int  # embedding rows (all frames of a video); 0: unknown (audio)
    num_tiles: int
    pixels: int  # width x height; 0: unknown


@dataclass(frozen=True, slots=True)
class EncoderStats:
    """Live state for metrics."""

    queued_tiles: int  # waiting for a tower call (the autoscaling signal)
    tower_calls: int
    store_bytes: int
    store_items: int


class Encoder:
    """Resolves, preprocesses and encodes media items, reusing stored results."""

    def __init__(self, config: EncoderConfig, tower: Tower,
                 preprocessor: Preprocessor | None = None) -> None:
        """`preprocessor`: the family's, when the caller already built it (the server's
        servicer describes it before the tower is loaded); else built here."""
        preprocessor = preprocessor or build_preprocessor(config)
        if config.hidden_size is not None and tower.hidden_size != config.hidden_size:
            raise ValueError(f"tower output width {tower.hidden_size} != configured "
                             f"hidden_size {config.hidden_size}")
        if tower.tokens_per_tile != preprocessor.tokens_per_tile:
            raise ValueError(f"tower gives {tower.tokens_per_tile} rows per tile, "
                             f"{preprocessor.family} "
                             f"preprocessing expects {preprocessor.tokens_per_tile}")
        self.config = config
        self.preprocessor = preprocessor
        self.tower = tower
        self.store = ContentStore(config.cache_capacity_bytes)
        self.media_store = build_media_store(
            config.media_store, path=config.media_store_path, url=config.media_store_url,
            capacity_bytes=config.media_store_capacity_bytes, ttl_s=config.media_store_ttl_s,
            max_entry_bytes=config.max_media_bytes, timeout_s=config.media_store_timeout_s)
        self.handles = HandleStore(self.store, self.media_store, config.media_store_ttl_s)
        self.resolver = MediaResolver(config, self.handles)
        self.batcher = TileBatcher(tower, config.max_batch_tiles)
        self.pixels = PixelBudget(config.max_decoded_bytes)
        self._item_lock = asyncio.Lock()  # towers that take whole items run one at a time

    @property
    def hidden_size(self) -> int:
        return self.tower.hidden_size

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        await self.media_store.close()

    def stats(self) -> EncoderStats:
        return EncoderStats(self.batcher.queued_tiles, self.batcher.tower_calls,
                            self.store.nbytes, len(self.store))

    async def encode_all(self, items: Sequence[MediaItem], tenant: str = "",
                         ) -> AsyncGenerator[list[EncodedItem], None]:
        """Encodes all items concurrently and yields each one's results in request order;
        handles are minted and resolved for `tenant` (the default tenant: "").

        The first failure (in request order) is raised; the other items are cancelled.
        """
        self._check_count(items)
        tasks = [asyncio.create_task(self.encode(item, tenant)) for item in items]
        try:
            for task in tasks:
                yield await task
        finally:
            for task in tasks:
                task.cancel()
            # Collects what the cancelled or failed tasks raised, so nothing is left unretrieved.
            await asyncio.gather(*tasks, return_exceptions=True)

    def _check_count(self, items: Sequence[MediaItem]) -> None:
        if not items:
            raise InvalidRequest("the request has no media items")
        if len(items) > self.config.max_items_per_request:
            raise InvalidRequest(f"the request has {len(items)} media items; the limit is "
                                 f"{self.config.max_items_per_request} per request")

    async def encode(self, item: MediaItem, tenant: str = "") -> list[EncodedItem]:
        """One item's encoded items (one per frame for a video), from the store when seen."""
        modality, modalities = item.modality, self.preprocessor.modalities
        if modality == Modality.VIDEO:
            return await self._encode_video(item, tenant)
        if modality not in modalities:
            raise InvalidRequest(f"this encoder ({self.preprocessor.family}) encodes "
                                 f"{', '.join(m.label for m in modalities)} only, got a "
                                 f"{modality.label} item")
        if modality == Modality.AUDIO:
            return [await self._encode_audio(item, tenant)]
        max_tiles = self._max_tiles(item.max_tiles)
        source, digest = await self.resolver.load_image_source(item.ref, tenant)
        if isinstance(source, Image.Image):  # decoded already, behind its handle
            assert digest is not None
            return [await self._encode_image(source, max_tiles, handle=handle_for(digest))]
        width, height = await asyncio.to_thread(self.resolver.image_size, source)
        tiles, _ = self.preprocessor.image_rows(width, height, max_tiles)
        async with self.pixels.hold(pixel_bytes(width, height, tiles, self.config.image_size)):
            image = await self.resolver.decode(source)
            digest = await self.resolver.remember_image(source, image, tenant)
            return [await self._encode_image(image, max_tiles, handle=handle_for(digest))]

    async def plan_all(self, items: Sequence[MediaItem], tenant: str = "") -> list[ItemEstimate]:
        """Each item's rows, tiles and pixels from its header (nothing decoded), after the
        per-request pixel and row budgets."""
        self._check_count(items)
        estimates = list(await asyncio.gather(*(self._plan(item, tenant) for item in items)))
        pixels = sum(e.pixels for e in estimates)
        rows = sum(e.num_tokens for e in estimates)
        limit_pixels, limit_rows = self.config.max_request_pixels, self.config.max_request_rows
        if limit_pixels and pixels > limit_pixels:
            raise InvalidRequest(f"the request's images have {pixels} pixels in all; the limit "
                                 f"is {limit_pixels} per request; send fewer or smaller images")
        if limit_rows and rows > limit_rows:
            raise InvalidRequest(f"the request's media would become {rows} embedding rows; the "
                                 f"limit is {limit_rows} per request; send fewer or smaller "
                                 f"images, or a lower max_tiles")
        return estimates

    async def _plan(self, item: MediaItem, tenant: str) -> ItemEstimate:
        per_tile = self.preprocessor.tokens_per_tile
        if item.modality == Modality.VIDEO:  # one tile per frame
            frames = len(item.frames) or item.num_frames or self.config.video_frames
            return ItemEstimate(frames * per_tile, frames, 0)
        if item.modality != Modality.IMAGE:
            return ItemEstimate(0, 0, 0)  # audio: known once decoded (and length-capped)
        max_tiles = self._max_tiles(item.max_tiles)
        source, _ = await self.resolver.load_image_source(item.ref, tenant)
        width, height = await asyncio.to_thread(self.resolver.image_size, source)
        tiles, rows = self.preprocessor.image_rows(width, height, max_tiles)
        return ItemEstimate(rows, tiles, width * height)

    def _max_tiles(self, requested: int) -> int:
        if requested > self.config.max_tiles:
            raise InvalidRequest(f"max_tiles {requested} exceeds this encoder's limit of "
                                 f"{self.config.max_tiles}; send 0 for the default")
        return requested or self.config.max_tiles

    async def _encode_image(self, image: Image.Image, max_tiles: int, handle: str,
                            frame: int = 0) -> EncodedItem:
        key = await asyncio.to_thread(self.preprocessor.content_hash, image, max_tiles)
        return await self._stored_or_encoded(key, frame, handle,
                                             self.preprocessor.preprocess, image, max_tiles)

    async def _encode_audio(self, item: MediaItem, tenant: str) -> EncodedItem:
        """Audio is decoded to 16 kHz samples, hashed and encoded as one item; the store
        keeps the file, so its handle can stand in for it later."""
        data, digest = await self.resolver.resolve_file(item.ref, Modality.AUDIO, tenant)
        samples = await asyncio.to_thread(self.preprocessor.decode_audio, data)
        key = await asyncio.to_thread(self.preprocessor.content_hash, samples, 0)
        return await self._stored_or_encoded(key, 0, handle_for(digest),
                                             self.preprocessor.preprocess, samples, 0)

    async def _encode_video(self, item: MediaItem, tenant: str) -> list[EncodedItem]:
        """Frames of one tile each, every frame an item: sampled from a file by InternVL's
        rule (the store keeps the file, so its handle can be sampled again, into any number
        of frames), or the frames the client sent."""
        family = self.preprocessor.family
        if Modality.IMAGE not in self.preprocessor.modalities or \
                (not item.frames and not self.preprocessor.samples_video):
            raise InvalidRequest(f"this encoder ({family}) encodes "
                                 f"{', '.join(m.label for m in self.preprocessor.modalities)} "
                                 f"only, got a video item"
                                 + ("; send the video as frames" if Modality.IMAGE in
                                    self.preprocessor.modalities else ""))
        if item.frames:
            loaded = await asyncio.gather(*(self.resolver.resolve_image(f, tenant)
                                            for f in item.frames))
            frames = [image for image, _ in loaded]
            handles = [handle_for(digest) for _, digest in loaded]  # each frame its own
        else:
            frames, handle = await self._sample(item, tenant)
            handles = [handle] * len(frames)  # all frames name the file
        if len(frames) > MAX_VIDEO_FRAMES:
            raise InvalidRequest(f"the video has {len(frames)} frames; the limit is "
                                 f"{MAX_VIDEO_FRAMES}")
        return list(await asyncio.gather(*(
            self._encode_image(image, 1, frame=k, handle=handle)
            for k, (image, handle) in enumerate(zip(frames, handles), start=1))))

    async def _sample(self, item: MediaItem, tenant: str) -> tuple[list[Image.Image], str]:
        """The sampled frames of a video file and the handle of the stored file."""
        num_frames = item.num_frames or self.config.video_frames
        if num_frames > MAX_VIDEO_FRAMES:
            raise InvalidRequest(f"num_frames {num_frames} exceeds the limit of "
                                 f"{MAX_VIDEO_FRAMES}; send 0 for the default")
        data, digest = await self.resolver.resolve_file(item.ref, Modality.VIDEO, tenant)
        frames = await asyncio.to_thread(sample_frames, data, num_frames,
                                         self.config.max_image_pixels,
                                         self.config.max_video_scanned_frames)
        return frames, handle_for(digest)

    async def _stored_or_encoded(self, key: str, frame: int, handle: str,
                                 preprocess: Callable[..., Preprocessed],
                                 *args: Any) -> EncodedItem:
        """The stored rows under `key` (the content hash), or `preprocess(*args)` run through
        the tower and stored; `handle` names the media they came from."""
        stored = self.store.get(key)
        if stored is not None and stored.embeddings is not None:
            return EncodedItem(stored.embeddings, key, handle, stored.num_tiles, frame,
                               cached=True)
        with stage("preprocess"):
            prepared = await asyncio.to_thread(preprocess, *args)
        rows = await self._run_tower(prepared)
        self.store.put(key, StoredItem(b"", rows, prepared.num_tiles))
        return EncodedItem(rows, key, handle, prepared.num_tiles, frame)

    async def _run_tower(self, prepared: Preprocessed) -> torch.Tensor:
        """[num_tokens, hidden] rows of one preprocessed item."""
        if not self.tower.batches_tiles:
            async with self._item_lock:
                with stage("tower"):
                    return await asyncio.to_thread(self.tower.encode_item, prepared)
        if not isinstance(prepared, Tiles):
            raise TypeError(f"{type(self.tower).__name__} batches tiles, but "
                            f"{self.preprocessor.family} preprocessing gave "
                            f"{type(prepared).__name__}")
        with span("tower"):  # the batcher records its queue wait and tower time
            tiles = await self.batcher.encode(prepared.pixel_values)
        with stage("merge"):
            return await asyncio.to_thread(self.tower.merge, tiles, prepared)

