"""Prometheus metrics of the LLM service, under vLLM's names where the meaning is the same.

Inference routers (Gateway API Inference Extension, llm-d) and vLLM dashboards read
`vllm:num_requests_waiting` and `vllm:kv_cache_usage_perc`, so these keep vLLM v1's
names, types, `model_name` label and histogram buckets:

    vllm:num_requests_running / vllm:num_requests_waiting     gauges (engine stats at scrape)
    vllm:kv_cache_usage_perc                                  gauge, 0..1
    vllm:prefix_cache_queries / vllm:prefix_cache_hits        counters, in prompt tokens
    vllm:prompt_tokens / vllm:generation_tokens               counters
    vllm:request_success{finished_reason}                     counter
    vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds,
    vllm:e2e_request_latency_seconds, vllm:request_queue_time_seconds   histograms

plus `mmserve:encode_seconds` (the LLM side of the encoder stage: all of a request's
Encode calls, concurrent) and `mmserve:encode_items` (by cached).

`DrainRate` measures requests finished per second; `retry_after_s` turns a queue length
into the `Retry-After` a refused client gets.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llm_service.engine.protocol import EngineStats

# vLLM v1 (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ENCODE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class DrainRate:
    """Requests finished per second over the last `window_s` seconds (shorter right after
    start-up, never under one second)."""

    def __init__(self, window_s: float = 30.0, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._window_s = window_s
        self._clock = clock
        self._started = clock()
        self._finished: deque[float] = deque()

    def finished(self) -> None:
        self._finished.append(self._clock())

    def per_second(self) -> float:
        now = self._clock()
        while self._finished and self._finished[0] < now - self._window_s:
            self._finished.popleft()
        span = max(1.0, min(self._window_s, now - self._started))
        return len(self._finished) / span

    def retry_after_s(self, queued: int, unknown_s: int = 5, cap_s: int = 600) -> int:
        """Seconds until `queued` requests ahead of a new one have drained at the measured
        rate, at least 1; `unknown_s` while nothing has finished lately."""
        rate = self.per_second()
        if rate <= 0:
            return unknown_s
        return max(1, min(cap_s, math.ceil((queued + 1) / rate)))


class _EngineGauges(Collector):
    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self._model_name = model_name
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        for name, doc, value in (
                ("vllm:num_requests_running", "Number of requests in model execution batches.",
                 s.running),
                ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                 s.waiting),
                ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                 s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)):
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric([self._model_name], value)
            yield gauge


class LLMMetrics:
    """The instruments, in a registry of their own (several services in one test process)."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.drain = DrainRate()
        self.registry.register(_EngineGauges(model_name, stats))
        labels = ["model_name"]

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self.prefix_queries = counter("vllm:prefix_cache_queries",
                                      "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_hits = counter("vllm:prefix_cache_hits",
                                   "Prefix cache hits, in terms of number of cached tokens.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.")
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               ["model_name", "finished_reason"], registry=self.registry)
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.",
                                    REQUEST_LATENCY_BUCKETS)
        self.encode = histogram("mmserve:encode_seconds",
                                "All Encode calls of a request with media, seen from the LLM "
                                "service.", ENCODE_BUCKETS)

    def request(self) -> RequestTimer:
        return RequestTimer(self)

    def serve(self, host: str, port: int) -> WSGIServer:
        """Serves /metrics on its own thread; shutdown() on the result stops it."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server


class RequestTimer:
    """Observes one request: token arrivals, then `finish()` once."""

    def __init__(self, metrics: LLMMetrics) -> None:
        self._m = metrics
        self._label = metrics.model_name
        # looked up once: `tokens` runs for every streamed chunk
        self._ttft = metrics.ttft.labels(self._label)
        self._itl = metrics.itl.labels(self._label)
        self._started = time.perf_counter()
        self._last: float | None = None

    def tokens(self, count: int) -> None:
        """`count` new tokens arrived now."""
        if count <= 0:
            return
        now = time.perf_counter()
        if self._last is None:
            self._ttft.observe(now - self._started)
        else:
            self._itl.observe(now - self._last)
        self._last = now

    def timings(self, queue_s: float, encode_s: float, with_media: bool) -> None:
        self._m.queue_time.labels(self._label).observe(queue_s)
        if with_media:
            self._m.encode.labels(self._label).observe(encode_s)

    def finish(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int,
               finished_reason: str | None) -> None:
        """The request ended; `finished_reason` None: it failed or was cancelled."""
        label, m = self._label, self._m
        m.e2e.labels(label).observe(time.perf_counter() - self._started)
        m.prompt_tokens.labels(label).inc(prompt_tokens)
        m.generation_tokens.labels(label).inc(completion_tokens)
        m.prefix_queries.labels(label).inc(prompt_tokens)
        m.prefix_hits.labels(label).inc(cached_tokens)
        if finished_reason is not None:
            m.success.labels(label, finished_reason).inc()
        m.drain.finished()
