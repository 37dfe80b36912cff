"""Where an Encode call's time goes: a histogram and a trace span per stage.

    mmserve:encoder_stage_seconds{stage}           fetch (download or read), decode,
                                                   preprocess, queue (waiting for a tower
                                                   call), tower, merge
    mmserve:encoder_transfer_seconds{transport}    handing one item's rows over: shm, inband
    mmserve:encoder_transfer_bytes{transport}      the bytes of those rows

The servicer makes its `Stages` current for the call (`Stages.activate`); code deeper down marks a
stage with `stage(name)` without knowing the server (tasks and threads it starts inherit the
context). Outside a call, or with metrics and tracing off, a stage costs a context lookup.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

from prometheus_client import Histogram
from prometheus_client.core import Metric

from mmserve.tracing import span

_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                  30.0, 60.0)
_BYTES_BUCKETS = tuple(float(4 ** i * 1024) for i in range(9))  # 1 KiB .. 64 MiB

_current: contextvars.ContextVar[Stages | None] = contextvars.ContextVar("encoder_stages",
                                                                         default=None)


class Stages:
    """The stage histograms of one encoder server (in no global registry)."""

    def __init__(self) -> None:
        self.seconds = Histogram("mmserve:encoder_stage_seconds",
                                 "Seconds per stage of encoding one media item", ["stage"],
                                 buckets=_STAGE_BUCKETS, registry=None)
        self.transfer_seconds = Histogram("mmserve:encoder_transfer_seconds",
                                          "Seconds to hand one item's rows to the caller",
                                          ["transport"], buckets=_STAGE_BUCKETS, registry=None)
        self.transfer_bytes = Histogram("mmserve:encoder_transfer_bytes",
                                        "Embedding bytes of one item handed to the caller",
                                        ["transport"], buckets=_BYTES_BUCKETS, registry=None)

    def activate(self) -> None:
        """Makes these the stages of the calling task (one task per RPC: no reset needed)."""
        _current.set(self)

    def observe(self, stage_name: str, seconds: float) -> None:
        self.seconds.labels(stage_name).observe(seconds)

    def transfer(self, transport: str, seconds: float, nbytes: int) -> None:
        self.transfer_seconds.labels(transport).observe(seconds)
        self.transfer_bytes.labels(transport).observe(nbytes)

    def collect(self) -> Iterator[Metric]:
        for histogram in (self.seconds, self.transfer_seconds, self.transfer_bytes):
            yield from histogram.collect()


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Times the block as stage `name` of the current call, with a span when traced."""
    stages = _current.get()
    started = time.perf_counter()
    with span(name):
        try:
            yield
        finally:
            if stages is not None:
                stages.observe(name, time.perf_counter() - started)


def observe(name: str, seconds: float) -> None:
    """Records a stage measured elsewhere (the tower batcher's queue wait)."""
    stages = _current.get()
    if stages is not None:
        stages.observe(name, seconds)


def current() -> Stages | None:
    return _current.get()
