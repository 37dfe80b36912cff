"""Batches tiles from concurrent requests into single tower calls.

One worker task takes queued jobs in arrival order, up to `max_batch_tiles` tiles
per call (a larger single job still runs, alone), and runs the tower in a thread
so the event loop keeps serving. Jobs that arrive while the tower is busy form
the next batch, so batching happens under load without any added wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from encoder_service import stages
from encoder_service.errors import Unavailable
from encoder_service.towers.base import Tower

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Job:
    pixel_values: torch.Tensor  # [tiles, 3, H, W]
    future: asyncio.Future[torch.Tensor]
    queued_at: float = 0.0  # time.perf_counter() when queued
    ran_at: float = 0.0  # when its tower call started


class TileBatcher:
    """`await encode(pixel_values)` -> that job's rows of one (possibly shared) tower call."""

    def __init__(self, tower: Tower, max_batch_tiles: int) -> None:
        self._tower = tower
        self._max_batch_tiles = max_batch_tiles
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._held: deque[_Job] = deque()  # taken from the queue but did not fit the last batch
        self._worker: asyncio.Task[None] | None = None
        self.tower_calls = 0
        self.queued_tiles = 0  # waiting for a tower call

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="tile-batcher")

    async def stop(self) -> None:
        """Stops the worker; jobs still waiting fail with Unavailable."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        while not self._queue.empty():
            self._held.append(self._queue.get_nowait())
        self._fail(self._held, Unavailable("the encoder is shutting down; retry"))
        self._held.clear()
        self.queued_tiles = 0

    async def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, H, W] -> [tiles, tokens_per_tile, hidden]."""
        if self._worker is None:
            raise Unavailable("the encoder is not running; retry")
        future = asyncio.get_running_loop().create_future()
        job = _Job(pixel_values, future, time.perf_counter())
        self._queue.put_nowait(job)
        self.queued_tiles += pixel_values.shape[0]
        rows = await future
        stages.observe("queue", job.ran_at - job.queued_at)
        stages.observe("tower", time.perf_counter() - job.ran_at)
        return rows

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._execute(batch)

    async def _next_batch(self) -> list[_Job]:
        if not self._held:
            self._held.append(await self._queue.get())
        while not self._queue.empty():
            self._held.append(self._queue.get_nowait())
        batch: list[_Job] = []
        tiles = 0
        while self._held:
            job = self._held[0]
            size = job.pixel_values.shape[0]
            if batch and tiles + size > self._max_batch_tiles:
                break
            self._held.popleft()
            self.queued_tiles -= size
            if job.future.cancelled():  # the caller went away while it waited
                continue
            batch.append(job)
            tiles += size
        return batch

    async def _execute(self, batch: list[_Job]) -> None:
        pixel_values = torch.cat([job.pixel_values for job in batch])
        ran_at = time.perf_counter()
        for job in batch:
            job.ran_at = ran_at
        try:
            self.tower_calls += 1
            embeddings = await asyncio.to_thread(self._tower.encode, pixel_values)
        except asyncio.CancelledError:
            self._fail(batch, Unavailable("the encoder is shutting down; retry"))
            raise
        except Exception as exc:
            log.exception("tower failed on a batch of %d tiles", pixel_values.shape[0])
            self._fail(batch, exc)
            return
        start = 0
        for job in batch:
            end = start + job.pixel_values.shape[0]
            # A copy, so a cached item does not keep the whole batch's tensor alive.
            rows = embeddings[start:end].clone() if len(batch) > 1 else embeddings
            if not job.future.done():
                job.future.set_result(rows)
            start = end

    @staticmethod
    def _fail(jobs: list[_Job] | deque[_Job], error: Exception) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)
