"""Prometheus instruments of one gateway."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from gateway.request_record import RequestRecord

# Generations run from milliseconds (a cached short answer) to minutes.
_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    """Request, latency and token metrics, in a registry of their own so that
    several apps in one process (tests) never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mmserve_gateway_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("mmserve_gateway_request_duration_seconds",
                                 "Time from request to the end of the response", ["route"],
                                 buckets=_LATENCY_BUCKETS_S, registry=self.registry)
        self.ttft = Histogram("mmserve_gateway_time_to_first_token_seconds",
                              "Time from request to the first generated text", ["route"],
                              buckets=_TTFT_BUCKETS_S, registry=self.registry)
        self.prompt_tokens = Counter("mmserve_gateway_prompt_tokens", "Prompt tokens processed",
                                     registry=self.registry)
        self.generated_tokens = Counter("mmserve_gateway_generation_tokens",
                                        "Completion tokens generated", registry=self.registry)
        self.in_flight = Gauge("mmserve_gateway_requests_in_flight",
                               "HTTP requests being served", registry=self.registry)

    def observe(self, record: RequestRecord, route: str, status: int, elapsed_s: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(elapsed_s)
        if record.ttft_s is not None:
            self.ttft.labels(route).observe(record.ttft_s)
        self.prompt_tokens.inc(record.prompt_tokens)
        self.generated_tokens.inc(record.completion_tokens)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
