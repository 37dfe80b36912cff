"""Prometheus metrics of one encoder server, read from its live state at scrape time.

    mmserve_encoder_queue_depth                tiles waiting for the tower (the HPA signal)
    mmserve_encoder_requests_total{status}     Encode calls by gRPC status
    mmserve_encoder_items_total{cached}        items encoded, or served from the content store
    mmserve_encoder_tiles_total                tiles (slices, frames) of those items
    mmserve_encoder_tower_calls_total          tower runs (batched across requests)
    mmserve_encoder_content_store_bytes        bytes held by the content store
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class EncoderMetrics(Collector):
    """Counts calls; everything else is read from the encoder (None while it loads)."""

    def __init__(self, encoder: Callable[[], object]) -> None:
        self._encoder = encoder
        self.requests: Counter[str] = Counter()
        self.items: Counter[bool] = Counter()
        self.tiles = 0

    def record(self, status: str, items: int, cached: int, tiles: int) -> None:
        self.requests[status] += 1
        self.items[True] += cached
        self.items[False] += items - cached
        self.tiles += tiles

    def collect(self) -> Iterator[Metric]:
        encoder = self._encoder()
        yield GaugeMetricFamily("mmserve_encoder_queue_depth", "Tiles waiting for the tower",
                                value=encoder.batcher.queued_tiles if encoder else 0)
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
                                  value=encoder.batcher.tower_calls if encoder else 0)
        yield GaugeMetricFamily("mmserve_encoder_content_store_bytes",
                                "Bytes held by the content store",
                                value=encoder.store.nbytes if encoder else 0)


def serve_metrics(metrics: EncoderMetrics, host: str, port: int):
    """Serves /metrics on its own thread; returns the HTTP server (shutdown() stops it)."""
    registry = CollectorRegistry()
    registry.register(metrics)
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server
