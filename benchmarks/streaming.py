"""Streamed OpenAI requests against a running server, timed per request; process-tree memory.

Shared by the benchmarks that measure whole servers (ours and peers) from the outside, the
way a client sees them: time to the first text, inter-token latency, tokens per second.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass(slots=True)
class Timing:
    """One streamed request as the client saw it."""

    status: int
    started: float
    first_text: float | None = None  # first chunk carrying text
    ended: float = 0.0
    tokens: int = 0  # completion tokens (usage), or text chunks when the server sends none
    error: str | None = None
    server_timing: dict[str, float] = field(default_factory=dict)  # Server-Timing, ms

    @property
    def ttft(self) -> float | None:
        return None if self.first_text is None else self.first_text - self.started

    @property
    def itl(self) -> float | None:
        """Mean gap between tokens after the first (time per output token)."""
        if self.first_text is None or self.tokens < 2:
            return None
        return (self.ended - self.first_text) / (self.tokens - 1)


def client_session(base_url: str, concurrency: int, timeout: float,
                   headers: dict | None = None) -> aiohttp.ClientSession:
    """The load generator's HTTP client. On 2 cores the client shares the machine with the
    server it measures, and what it spends is taken from that server: aiohttp (C parser)
    reads a streamed token for 84-98 us of CPU where httpx took 140-153 (SmolLM2 c=64)."""
    return aiohttp.ClientSession(
        base_url=base_url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout),
        connector=aiohttp.TCPConnector(limit=concurrency), read_bufsize=2**20)


async def stream_one(client: aiohttp.ClientSession, path: str, body: dict) -> Timing:
    """POSTs a streaming request and reads its SSE events to the end."""
    timing = Timing(0, time.perf_counter())
    chunks = usage = 0
    try:
        async with client.post(path, json=body) as response:
            timing.status = response.status
            timing.server_timing = parse_server_timing(response.headers.get("server-timing", ""))
            if response.status != 200:
                timing.error = (await response.read()).decode(errors="replace")[:200]
                return timing
            async for raw in response.content:
                line = raw.rstrip(b"\r\n")
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                for choice in event.get("choices") or ():
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if text:
                        chunks += 1
                        if timing.first_text is None:
                            timing.first_text = time.perf_counter()
                if event.get("usage"):
                    usage = event["usage"].get("completion_tokens", 0)
                if "error" in event:
                    timing.error = str(event["error"])[:200]
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
    finally:
        timing.ended = time.perf_counter()
    timing.tokens = usage or chunks
    return timing


@dataclass(slots=True)
class LoadResult:
    timings: list[Timing]
    seconds: float

    @property
    def ok(self) -> list[Timing]:
        return [t for t in self.timings if t.status == 200 and t.error is None]

    @property
    def tokens_per_s(self) -> float:
        return sum(t.tokens for t in self.ok) / self.seconds if self.seconds else 0.0

    def ttfts(self) -> list[float]:
        return [t.ttft for t in self.ok if t.ttft is not None]

    @property
    def mean_ttft(self) -> float:
        values = self.ttfts()
        return statistics.mean(values) if values else float("nan")

    @property
    def p99_ttft(self) -> float:
        return percentile(self.ttfts(), 99)

    def mean_server_timing(self, name: str) -> float:
        values = [t.server_timing[name] for t in self.ok if name in t.server_timing]
        return statistics.mean(values) if values else float("nan")

    @property
    def mean_itl(self) -> float:
        values = [t.itl for t in self.ok if t.itl is not None]
        return statistics.mean(values) if values else float("nan")


def parse_server_timing(header: str) -> dict[str, float]:
    """`encode;dur=12.5, prefill;dur=40.1` -> {"encode": 12.5, "prefill": 40.1}."""
    out = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                out[name] = float(value)
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def closed_loop(base_url: str, path: str, bodies: list[dict], concurrency: int,
                      headers: dict | None = None, timeout: float = 600.0) -> LoadResult:
    """`concurrency` clients take the bodies in order, each sending its next request as soon
    as its previous one ended."""
    pending = iter(bodies)
    timings: list[Timing] = []
    async with client_session(base_url, concurrency, timeout, headers) as client:
        async def worker() -> None:
            for body in pending:
                timings.append(await stream_one(client, path, body))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return LoadResult(timings, seconds)


def _proc_stats() -> dict[int, list[str]]:
    """Every process's /proc/<pid>/stat fields after the command name."""
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stats[int(entry)] = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
    return stats


def _tree(root: int, stats: dict[int, list[str]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_rss_bytes(root: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    stats = _proc_stats()
    page = os.sysconf("SC_PAGE_SIZE")
    return sum(int(stats[pid][21]) * page for pid in _tree(root, stats) if pid in stats)


def process_label(pid: int) -> str:
    """A short name for a process: the module after `-m`, the command after `serve`-style
    launchers, or the command name (what setproctitle shows, e.g. vLLM's engine core)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return "?"
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    if any("multiprocessing" in a for a in argv):
        return f"{comm} (child)"
    return os.path.basename(argv[0]) + (f" {argv[1]}" if len(argv) > 1 else "") \
        if comm in ("python", "python3") and argv else comm


def tree_cpu_seconds(root: int) -> dict[int, tuple[str, float]]:
    """CPU time (user + system) so far of a process and its descendants, by pid."""
    stats = _proc_stats()
    tick = os.sysconf("SC_CLK_TCK")
    return {pid: (process_label(pid), (int(stats[pid][11]) + int(stats[pid][12])) / tick)
            for pid in _tree(root, stats) if pid in stats}


@dataclass
class CpuTime:
    """CPU seconds each process of a tree spent inside the block: `with CpuTime(pid) as t:`;
    `t.by_process` maps a label (see `process_label`) to seconds."""

    root: int
    by_process: dict[str, float] = field(default_factory=dict)
    _before: dict[int, tuple[str, float]] = field(default_factory=dict)

    def __enter__(self) -> CpuTime:
        self._before = tree_cpu_seconds(self.root)
        return self

    def __exit__(self, *exc) -> None:
        for pid, (label, seconds) in tree_cpu_seconds(self.root).items():
            spent = seconds - self._before.get(pid, (label, 0.0))[1]
            self.by_process[label] = self.by_process.get(label, 0.0) + spent


@dataclass
class PeakRss:
    """Samples a process tree's RSS in the background while in use: `with PeakRss(pid) as p:`."""

    root: int
    interval: float = 0.25
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.root))
            self._stop.wait(self.interval)
