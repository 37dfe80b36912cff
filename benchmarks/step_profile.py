"""Where a CPU engine step's time goes, on benchmarks/engine.py's workload.

Runs TorchEngine (step loop in a thread, so one process holds every timer) on c requests of
~128 prompt and 128 output tokens and times each part of every step with wall clocks: the
four projections of each layer, attention, norms, rope + cache write, the lm_head, sampling
and the step's inputs. Projections and the lm_head also print the GFLOP/s they reached,
beside a plain torch.mm of the same shape at 512 rows (a ceiling for this machine's
matmuls). CPU ops run synchronously, so the wall clock around a call is the call's time.

    python -m benchmarks.step_profile                       # fp32 and bf16, c = 16 and 64
    python -m benchmarks.step_profile --dtype bfloat16 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from benchmarks.engine import KV_CACHE_BYTES, OUTPUT_LEN, in_fresh_process, make_prompts


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.flops: dict[str, float] = defaultdict(float)
        self.on = False

    def wrap(self, owner: Any, attr: str, key: str,
             flops: Callable[..., float] | None = None) -> None:
        """Times owner.attr; `flops(*args)`: the floating-point operations of one call."""
        inner = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return inner(*args, **kwargs)
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - started
                self.calls[key] += 1
                if flops is not None:
                    self.flops[key] += flops(*args)

        setattr(owner, attr, timed)

    def wrap_linear(self, linear_cls: Any, roles: Callable[[int, int], str]) -> None:
        inner = linear_cls.forward

        def timed(module: Any, x: Any) -> Any:
            if not self.on:
                return inner(module, x)
            started = time.perf_counter()
            out = inner(module, x)
            key = roles(module.in_features, module.out_features)
            self.seconds[key] += time.perf_counter() - started
            self.calls[key] += 1
            self.flops[key] += 2.0 * x.shape[0] * module.in_features * module.out_features
            return out

        linear_cls.forward = timed


def matmul_ceiling(dtype: Any, k: int, n: int, rows: int = 512) -> float:
    """GFLOP/s of torch.mm at [rows, k] x [k, n] (best of 5)."""
    import torch

    a, b = torch.randn(rows, k).to(dtype), torch.randn(k, n).to(dtype)
    best = float("inf")
    for _ in range(6):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2.0 * rows * k * n / best / 1e9


def profile(dtype: str, concurrency: int, threads: int) -> None:
    import torch

    from benchmarks.engine import _run_engine
    from llm_service.engine import model_runner, sampler
    from llm_service.engine.async_engine import TorchEngine
    from llm_service.engine.config import EngineConfig
    from llm_service.engine.models import llama
    from llm_service.engine.models.loader import read_spec
    from llm_service.weights import ensure_embedded_checkpoint

    torch.set_num_threads(threads)
    checkpoint = ensure_embedded_checkpoint()
    spec = read_spec(checkpoint)
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes = {(spec.hidden_size, q + 2 * kv): "qkv", (q, spec.hidden_size): "o",
              (spec.hidden_size, 2 * spec.intermediate_size): "gate_up",
              (spec.intermediate_size, spec.hidden_size): "down"}
    timers = Timers()
    timers.wrap_linear(llama.Linear, lambda k, n: shapes.get((k, n), f"linear {k}x{n}"))
    timers.wrap(llama, "paged_attention", "attention")
    timers.wrap(llama.RMSNorm, "forward", "norms")
    timers.wrap(llama.DecoderLayer, "_rotate_and_cache", "rope + cache write")
    timers.wrap(llama.DecoderLM, "compute_logits", "lm_head (+ final norm)",
                lambda _model, hidden: 2.0 * hidden.shape[0] * spec.hidden_size * spec.vocab_size)
    timers.wrap(llama.DecoderLM, "forward", "(model forward)")
    timers.wrap(sampler.Sampler, "__call__", "sampling")
    timers.wrap(model_runner.ModelRunner, "prepare", "step inputs")
    timers.wrap(model_runner.ModelRunner, "execute", "(whole steps)")

    prompts = make_prompts(concurrency)

    async def run() -> float:
        engine = TorchEngine(EngineConfig(model_dir=checkpoint, device="cpu", dtype=dtype,
                                          kv_cache_bytes=KV_CACHE_BYTES, placement="thread"))
        await engine.start()
        try:
            await _run_engine(engine, [[7] + p[1:] for p in prompts[:2]], "warmup", 8)
            timers.on = True
            started = time.perf_counter()
            result = await _run_engine(engine, prompts, "run", OUTPUT_LEN)
            wall = time.perf_counter() - started
            timers.on = False
        finally:
            await engine.shutdown()
        print(f"\n{dtype}, c={concurrency}, {threads} threads: {result.tokens_per_s:.1f} tok/s "
              f"(timers on), {timers.calls['(whole steps)']} steps in {wall:.2f} s")
        return wall

    wall = asyncio.run(run())
    torch_dtype = model_runner.DTYPES[dtype]
    ceilings = {"gate_up": (spec.hidden_size, 2 * spec.intermediate_size),
                "lm_head (+ final norm)": (spec.hidden_size, spec.vocab_size)}
    print(f"{'part':<24}{'seconds':>9}{'% of run':>10}{'ms/call':>9}{'GFLOP/s':>9}")
    for key in sorted(timers.seconds, key=lambda k: -timers.seconds[k]):
        seconds, calls = timers.seconds[key], timers.calls[key]
        rate = f"{timers.flops[key] / seconds / 1e9:9.0f}" if timers.flops[key] else ""
        print(f"{key:<24}{seconds:9.2f}{100 * seconds / wall:9.1f}%"
              f"{1e3 * seconds / calls:9.3f}{rate}")
    for key, (k, n) in ceilings.items():
        print(f"torch.mm ceiling, {key} shape at 512 rows: "
              f"{matmul_ceiling(torch_dtype, k, n):.0f} GFLOP/s")


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    for dtype in args.dtype:
        for c in args.concurrency:
            in_fresh_process(profile, dtype, c, args.threads)  # timers wrap a fresh import


if __name__ == "__main__":
    main()
