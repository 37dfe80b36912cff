"""Prometheus metrics of one encoder server, read from its live state at scrape time.

    mmserve_encoder_queue_depth                tiles waiting for the tower (the HPA signal)
    mmserve_encoder_requests_total{status}     Encode calls by gRPC status
    mmserve_encoder_items_total{cached}        items encoded, or served from the content store
    mmserve_encoder_tiles_total                tiles (slices, frames) of those items
    mmserve_encoder_tower_calls_total          tower runs (batched across requests)
    mmserve_encoder_content_store_bytes        bytes held by the content store
    mmserve:encoder_stage_seconds{stage}, mmserve:encoder_transfer_{seconds,bytes}{transport}
                                               histograms, see encoder_service.stages
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from encoder_service.stages import Stages

if TYPE_CHECKING:
    from encoder_service.encoder import EncoderStats


class EncoderMetrics(Collector):
    """Counts calls; everything else is read from the encoder's stats (None while it loads)."""

    def __init__(self, stats: Callable[[], EncoderStats | None]) -> None:
        self._stats = stats
        self.stages = Stages()
        self.requests: Counter[str] = Counter()
        self.items: Counter[bool] = Counter()
        self.tiles = 0

    def record(self, status: str, items: int, cached: int, tiles: int) -> None:
        self.requests[status] += 1
        self.items[True] += cached
        self.items[False] += items - cached
        self.tiles += tiles

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily("mmserve_encoder_queue_depth", "Tiles waiting for the tower",
                                value=stats.queued_tiles if stats else 0)
        requests = CounterMetricFamily("mmserve_encoder_requests", "Encode calls by status",
                                       labels=["status"])
        for status, count in sorted(self.requests.items()):
            requests.add_metric([status], count)
        yield requests
        items = CounterMetricFamily("mmserve_encoder_items",
                                    "Media items, by whether the content store served them",
                                    labels=["cached"])
        for cached in (False, True):
            items.add_metric([str(cached).lower()], self.items[cached])
        yield items
        yield CounterMetricFamily("mmserve_encoder_tiles", "Tiles, slices or frames encoded",
                                  value=self.tiles)
        yield CounterMetricFamily("mmserve_encoder_tower_calls", "Tower runs",
                                  value=stats.tower_calls if stats else 0)
        yield GaugeMetricFamily("mmserve_encoder_content_store_bytes",
                                "Bytes held by the content store",
                                value=stats.store_bytes if stats else 0)
        yield from self.stages.collect()


def serve_metrics(metrics: EncoderMetrics, host: str, port: int) -> WSGIServer:
    """Serves /metrics on its own thread; returns the HTTP server (shutdown() stops it)."""
    registry = CollectorRegistry()
    registry.register(metrics)
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server
