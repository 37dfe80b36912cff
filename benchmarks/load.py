"""Load: N concurrent streams for T seconds, against a running stack or one it starts.

Each of `--concurrency` clients streams chat completions back to back until `--seconds`
have passed (no new request starts after that; each one is bounded by `--timeout`). Printed:
the count of each HTTP status (200, 429, 503, ... and client-side errors), p50/p99 of the
whole request's latency and of the time to the first text, output tokens/s, and each
service's resident memory (its process tree) before and after.

    python -m benchmarks.load --start --concurrency 64 --seconds 60     # starts make run's stack
    python -m benchmarks.load --base http://127.0.0.1:8000 --concurrency 256 --seconds 120

Against a running stack the services' processes are found on this host by their command
line (`-m gateway`, `-m llm_service`, `-m encoder_service` or the mmserve-* scripts);
memory is left out for those not found.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.streaming import Timing, client_session, percentile, stream_one, tree_rss_bytes

SERVICES = {"gateway": ("-m gateway", "mmserve-gateway"),
            "llm": ("-m llm_service", "mmserve-llm"),
            "encoder": ("-m encoder_service", "mmserve-encoder")}


def service_pids(under: int | None = None) -> dict[str, int]:
    """The pid of each service found by its command line (below `under` when given)."""
    found: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if under is not None and parent != under:
            continue
        for name, marks in SERVICES.items():
            if any(mark in cmdline for mark in marks):
                found.setdefault(name, int(entry))
    return found


def rss_mib(pids: dict[str, int]) -> dict[str, float]:
    return {name: tree_rss_bytes(pid) / 2**20 for name, pid in pids.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_stack(log: Path, start_timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    ports = [free_port() for _ in range(3)]
    out = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mmserve.run", "--port", str(ports[0]),
                             "--llm-port", str(ports[1]), "--encoder-port", str(ports[2])],
                            stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + start_timeout_s
    while "mmserve is up" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"the stack did not start; see {log}")
        time.sleep(0.5)
    return proc, f"http://127.0.0.1:{ports[0]}"


async def run_load(base: str, concurrency: int, seconds: float, body: dict,
                   timeout: float, headers: dict[str, str]) -> tuple[list[Timing], float]:
    timings: list[Timing] = []
    async with client_session(base, concurrency, timeout, headers) as client:
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                timing = await stream_one(client, "/v1/chat/completions", body)
                timings.append(timing)
                if timing.status in (429, 503):  # back off as told, within the run
                    await asyncio.sleep(min(1.0, max(0.0, deadline - time.perf_counter())))

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))),
                               timeout=seconds + timeout + 10)
        return timings, time.perf_counter() - started


def _label(timing: Timing) -> str:
    if timing.status == 0:
        return "client error"  # no response: refused connection, timeout
    if timing.status == 200 and timing.error is not None:
        return "200 with an error event"
    return str(timing.status)


def report(timings: list[Timing], wall_s: float, before: dict[str, float],
           after: dict[str, float]) -> str:
    statuses = collections.Counter(_label(t) for t in timings)
    ok = [t for t in timings if t.status == 200 and t.error is None]
    latency = [t.ended - t.started for t in ok]
    ttft = [t.ttft for t in ok if t.ttft is not None]
    lines = [f"requests: {len(timings)} in {wall_s:.1f} s; status counts: "
             + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
             f"latency  p50 {percentile(latency, 50):.3f} s  p99 {percentile(latency, 99):.3f} s",
             f"TTFT     p50 {percentile(ttft, 50):.3f} s  p99 {percentile(ttft, 99):.3f} s",
             f"output   {sum(t.tokens for t in ok) / wall_s:.1f} tokens/s"]
    for name in SERVICES:
        if name in before and name in after:
            lines.append(f"RSS {name:8s} {before[name]:8.1f} MiB -> {after[name]:8.1f} MiB "
                         f"({after[name] - before[name]:+.1f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--base", help="the gateway's URL, e.g. http://127.0.0.1:8000")
    where.add_argument("--start", action="store_true", help="start make run's stack first")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=120, help="seconds per request")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default="smollm2-135m-instruct")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.seconds <= 0:
        p.error("--concurrency must be >= 1 and --seconds > 0")
    proc = None
    base = args.base
    if args.start:
        log = Path(tempfile.mkdtemp(prefix="mmserve-load-")) / "stack.log"
        proc, base = start_stack(log)
    try:
        pids = service_pids(proc.pid if proc else None)
        before = rss_mib(pids)
        body = {"model": args.model, "stream": True, "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": "Tell me a short story."}],
                "stream_options": {"include_usage": True}}
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        timings, wall = asyncio.run(run_load(base, args.concurrency, args.seconds, body,
                                             args.timeout, headers))
        after = rss_mib(pids)
        print(f"{args.concurrency} concurrent streams for {args.seconds:g} s against {base}")
        print(report(timings, wall, before, after))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
