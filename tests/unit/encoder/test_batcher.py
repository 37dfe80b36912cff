"""Tile batching across concurrent callers."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from encoder_service.batcher import TileBatcher
from encoder_service.errors import Unavailable
from encoder_service.towers.base import Tower


class RecordingTower(Tower):
    """Row values = the tile's marker (pixel [0,0,0]); the first call can be held open."""

    hidden_size = 4
    dtype = torch.float32
    tokens_per_tile = 2

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.entered = threading.Event()  # a tower call has started
        self.release = threading.Event()
        self.release.set()
        self.fail_with: Exception | None = None

    async def running(self) -> None:
        """Returns once the worker is inside a tower call."""
        assert await asyncio.to_thread(self.entered.wait, 5), "the tower was never called"

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.release.wait(timeout=5)
        self.batches.append(pixel_values[:, 0, 0, 0].tolist())
        if self.fail_with is not None:
            raise self.fail_with
        markers = pixel_values[:, 0, 0, 0]
        return markers.view(-1, 1, 1).expand(-1, self.tokens_per_tile, self.hidden_size).clone()


def tiles(*markers: float) -> torch.Tensor:
    values = torch.zeros(len(markers), 3, 2, 2)
    values[:, 0, 0, 0] = torch.tensor(markers)
    return values


@pytest.fixture
async def setup():
    tower = RecordingTower()
    batcher = TileBatcher(tower, max_batch_tiles=5)
    batcher.start()
    yield tower, batcher
    await batcher.stop()


async def queued(batcher: TileBatcher, tiles_waiting: int) -> None:
    """Lets the tasks just created submit their jobs (each runs up to its first await)."""
    await asyncio.sleep(0)
    assert batcher.queued_tiles == tiles_waiting


async def test_jobs_queued_while_the_tower_runs_share_the_next_call(setup):
    tower, batcher = setup
    tower.release.clear()
    first = asyncio.create_task(batcher.encode(tiles(1)))
    await tower.running()  # the worker is inside the held tower call
    rest = [asyncio.create_task(batcher.encode(tiles(*m))) for m in [(2, 3), (4,), (5, 6)]]
    await queued(batcher, 5)
    tower.release.set()
    results = await asyncio.gather(first, *rest)
    # 1 alone; then 2,3 + 4 = 3 tiles; 5,6 would make 5 (allowed), so all fit in one call.
    assert tower.batches == [[1.0], [2.0, 3.0, 4.0, 5.0, 6.0]]
    assert batcher.tower_calls == 2
    for result, markers in zip(results, [(1,), (2, 3), (4,), (5, 6)], strict=True):
        assert result.shape == (len(markers), 2, 4)
        assert result[:, 0, 0].tolist() == [float(m) for m in markers]


async def test_a_batch_never_exceeds_max_tiles_except_a_single_large_job(setup):
    tower, batcher = setup
    tower.release.clear()
    blocker = asyncio.create_task(batcher.encode(tiles(0)))
    await tower.running()
    jobs = [asyncio.create_task(batcher.encode(tiles(*m)))
            for m in [(1, 1, 1), (2, 2, 2), (3,) * 8, (4,)]]
    await queued(batcher, 15)
    tower.release.set()
    await asyncio.gather(blocker, *jobs)
    assert [len(b) for b in tower.batches] == [1, 3, 3, 8, 1]


async def test_a_tower_failure_reaches_every_caller_of_that_batch(setup):
    tower, batcher = setup
    tower.fail_with = RuntimeError("tower broke")
    results = await asyncio.gather(batcher.encode(tiles(1)), batcher.encode(tiles(2)),
                                   return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and str(r) == "tower broke" for r in results)
    tower.fail_with = None
    assert (await batcher.encode(tiles(7)))[0, 0, 0] == 7.0  # the worker survived


async def test_cancelled_waiters_are_skipped(setup):
    tower, batcher = setup
    tower.release.clear()
    blocker = asyncio.create_task(batcher.encode(tiles(0)))
    await tower.running()
    gone = asyncio.create_task(batcher.encode(tiles(9)))
    kept = asyncio.create_task(batcher.encode(tiles(8)))
    await queued(batcher, 2)
    gone.cancel()
    tower.release.set()
    await blocker
    assert (await kept)[0, 0, 0] == 8.0
    assert tower.batches == [[0.0], [8.0]]


async def test_stop_fails_waiting_jobs_and_refuses_new_ones():
    tower = RecordingTower()
    batcher = TileBatcher(tower, max_batch_tiles=5)
    batcher.start()
    tower.release.clear()
    running = asyncio.create_task(batcher.encode(tiles(1)))
    await tower.running()
    waiting = asyncio.create_task(batcher.encode(tiles(2)))
    await queued(batcher, 1)
    await batcher.stop()
    tower.release.set()
    for task in (running, waiting):
        with pytest.raises(Unavailable, match="shutting down"):
            await task
    with pytest.raises(Unavailable, match="not running"):
        await batcher.encode(tiles(3))
