"""The encoder's Prometheus endpoint: queue depth while the tower is busy, calls, items, tiles."""

from __future__ import annotations

import asyncio
import threading
import urllib.request

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from encoder_service.config import EncoderConfig
from encoder_service.server import EncoderServer
from encoder_service.towers.demo import DemoTower

from test_encoder_server import encode, png_data_url, url_item
from polling import eventually


class HeldTower(DemoTower):
    """The demo tower whose calls wait until released."""

    def __init__(self) -> None:
        super().__init__(hidden_size=576, dtype=torch.float32, seed=0)
        self.release = threading.Event()

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.release.wait(timeout=10)
        return super().encode(pixel_values)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def test_metrics_follow_the_work(tmp_path):
    tower = HeldTower()
    server = EncoderServer(EncoderConfig(host="127.0.0.1", port=0, metrics_port=0), tower=tower)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            first = asyncio.create_task(encode(channel, url_item(png_data_url(448, 448))))
            queued = asyncio.create_task(encode(channel, url_item(png_data_url(1000, 600))))
            # The 7 tiles wait behind the first.
            await eventually(lambda: server.encoder.batcher.queued_tiles == 7)
            busy = await asyncio.to_thread(scrape, server.metrics_port)
            tower.release.set()
            await first
            await queued
            url = png_data_url(640, 480)
            await encode(channel, url_item(url))
            await encode(channel, url_item(url))  # served from the content store
            with pytest.raises(grpc.aio.AioRpcError):
                await encode(channel, url_item("data:image/png;base64,%%%"))
        done = await asyncio.to_thread(scrape, server.metrics_port)
    finally:
        await server.stop(grace=0)
    assert busy[("mmserve_encoder_queue_depth", ())] == 7
    assert done[("mmserve_encoder_queue_depth", ())] == 0
    assert done[("mmserve_encoder_requests_total", (("status", "OK"),))] == 4
    assert done[("mmserve_encoder_requests_total", (("status", "INVALID_ARGUMENT"),))] == 1
    assert done[("mmserve_encoder_items_total", (("cached", "false"),))] == 3
    assert done[("mmserve_encoder_items_total", (("cached", "true"),))] == 1
    assert done[("mmserve_encoder_tiles_total", ())] == 1 + 7 + 13 + 13  # 640x480: 4x3 + thumbnail
    assert done[("mmserve_encoder_tower_calls_total", ())] == 3
    assert done[("mmserve_encoder_content_store_bytes", ())] > 0
    # Per-stage histograms: three items went through the tower, all four OK calls were
    # fetched, decoded and handed over in-band; the 7 queued tiles waited for the tower.
    stage = "mmserve:encoder_stage_seconds"
    for name in ("preprocess", "queue", "tower", "merge"):
        assert done[(f"{stage}_count", (("stage", name),))] == 3, name
    assert done[(f"{stage}_count", (("stage", "fetch"),))] >= 4
    assert done[(f"{stage}_count", (("stage", "decode"),))] >= 4
    assert done[(f"{stage}_sum", (("stage", "queue"),))] > 0
    inband = (("transport", "inband"),)
    assert done[("mmserve:encoder_transfer_seconds_count", inband)] == 4
    rows = (1 + 7 + 13 + 13) * 256  # 256 rows per tile, the cached item's too
    assert done[("mmserve:encoder_transfer_bytes_sum", inband)] == rows * 576 * 4  # float32
