"""Throughput and TTFT of TorchEngine against transformers, on one machine, in one run.

Every system serves the same workload: at concurrency c, c requests arrive at once, each a
distinct prompt of 96-160 tokens (128 on average) generating exactly 128 tokens (greedy, EOS
ignored). Reported per c: output tokens/s (all output tokens / time until the last one) and
mean time to first token.

TorchEngine runs in fp32 and, where the CPU has native bf16 matmuls, in bf16 too (the bf16
column; the baselines stay fp32). Baselines, all fp32 on the same device and thread count:
  one-at-a-time  transformers `generate` serving requests one by one (throughput does not
                 depend on c; TTFT includes the queueing behind earlier requests)
  static batch   transformers `generate` on the c prompts as one batch, left-padded to the
                 longest
  generate_batch transformers' continuous batching (`model.generate_batch`), sized like the
                 engine (512-token steps, KV room for every request)

Each measurement runs in a fresh process after a short warm-up, and the systems alternate
level by level, so load from other processes hits them alike.

    python -m benchmarks.engine            # c = 1, 4, 16, 64 (about 12 minutes on 2 cores)
    python -m benchmarks.engine --quick    # c = 1, 16 and one one-at-a-time request
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

PROMPT_LEN = 128
OUTPUT_LEN = 128
KV_CACHE_BYTES = 1536 * 1024**2  # room for 64 sequences of 256 tokens without preemption
TEXT = ("The history of the lighthouse keeper's island began with a storm that nobody in the "
        "village could forget. Ships broke on the rocks, and the fishermen argued for years about "
        "who should tend the lamp, how the oil would be paid for, and whether the light should "
        "turn at night or burn steadily until dawn. ")


@dataclass
class Result:
    tokens_per_s: float
    ttft_s: float


def prompt_len(i: int) -> int:
    """PROMPT_LEN - 32 .. PROMPT_LEN + 32, spread evenly over consecutive prompts."""
    return PROMPT_LEN - 32 + (i * 37) % 65


def make_prompts(count: int) -> list[list[int]]:
    """Distinct prompts (different from the first token on) of prompt_len(i) tokens."""
    from transformers import AutoTokenizer

    from llm_service.weights import ensure_embedded_checkpoint

    base = AutoTokenizer.from_pretrained(ensure_embedded_checkpoint()).encode(TEXT * 24)
    return [[1000 + i] + base[i * 7: i * 7 + prompt_len(i) - 1] for i in range(count)]


# --- TorchEngine -----------------------------------------------------------------------------

def measure_engine(prompts: list[list[int]], threads: int, dtype: str = "float32") -> Result:
    return asyncio.run(_measure_engine(prompts, threads, dtype))


async def _measure_engine(prompts: list[list[int]], threads: int, dtype: str) -> Result:
    import torch

    from llm_service.engine.async_engine import TorchEngine
    from llm_service.engine.config import EngineConfig
    from llm_service.weights import ensure_embedded_checkpoint

    torch.set_num_threads(threads)
    engine = TorchEngine(EngineConfig(model_dir=ensure_embedded_checkpoint(), device="cpu",
                                      dtype=dtype, kv_cache_bytes=KV_CACHE_BYTES))
    await engine.start()
    try:
        await _run_engine(engine, [[7] + p[1:] for p in prompts[:2]], "warmup", 8)
        return await _run_engine(engine, prompts, "run", OUTPUT_LEN)
    finally:
        await engine.shutdown()


async def _run_engine(engine, prompts: list[list[int]], tag: str, max_tokens: int) -> Result:
    from llm_service.engine.protocol import EngineRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    ttfts: list[float] = []

    async def one(i: int, ids: list[int]) -> int:
        count = 0
        async for out in engine.generate(EngineRequest(f"{tag}-{i}", ids, params)):
            if count == 0:
                ttfts.append(time.perf_counter() - started)
            count += len(out.new_token_ids)
        return count

    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return Result(sum(counts) / (time.perf_counter() - started), statistics.mean(ttfts))


# --- transformers ----------------------------------------------------------------------------

def _load_hf(threads: int):
    import torch
    from transformers import LlamaForCausalLM

    from llm_service.weights import ensure_embedded_checkpoint

    torch.set_num_threads(threads)
    return LlamaForCausalLM.from_pretrained(ensure_embedded_checkpoint(),
                                            dtype=torch.float32).eval()


def _hf_generate(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """One (left-padded) `generate` call; returns (seconds, seconds to the first token)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstStep(LogitsProcessor):  # called first right after the prefill
        at: float | None = None

        def __call__(self, input_ids, scores):
            self.at = self.at or time.perf_counter()
            return scores

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    first = FirstStep()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([first]))
    assert out.shape[1] == width + new_tokens
    return time.perf_counter() - started, first.at - started


def measure_one_at_a_time(prompts: list[list[int]], threads: int,
                          levels: list[int]) -> dict[int, Result]:
    """Measured on len(prompts) requests; c requests arriving together queue behind each other."""
    model = _load_hf(threads)
    _hf_generate(model, prompts[:1], 8)
    runs = [_hf_generate(model, [p], OUTPUT_LEN) for p in prompts]
    per_request = statistics.mean(r[0] for r in runs)
    prefill = statistics.mean(r[1] for r in runs)
    return {c: Result(OUTPUT_LEN / per_request, prefill + per_request * (c - 1) / 2)
            for c in levels}


def measure_static_batch(prompts: list[list[int]], threads: int) -> Result:
    model = _load_hf(threads)
    _hf_generate(model, prompts[:2], 8)
    seconds, ttft = _hf_generate(model, prompts, OUTPUT_LEN)
    return Result(len(prompts) * OUTPUT_LEN / seconds, ttft)


def measure_generate_batch(prompts: list[list[int]], threads: int) -> Result:
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = _load_hf(threads)

    def run(batch: list[list[int]], new_tokens: int) -> Result:
        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
        pages = -(-(PROMPT_LEN + new_tokens) // 256)
        cb = ContinuousBatchingConfig(num_blocks=len(batch) * pages + 4, max_batch_tokens=512)
        started = time.perf_counter()
        with torch.inference_mode():
            results = model.generate_batch(batch, generation_config=config, warmup=False,
                                           record_timestamps=True, continuous_batching_config=cb)
        elapsed = time.perf_counter() - started
        tokens = sum(len(r.generated_tokens) for r in results.values())
        ttfts = [r.timestamps[0] - started for r in results.values() if r.timestamps]
        return Result(tokens / elapsed, statistics.mean(ttfts) if ttfts else float("nan"))

    run(prompts[:2], 8)
    return run(prompts, OUTPUT_LEN)


# --- driver ----------------------------------------------------------------------------------

def in_fresh_process(fn, *args):
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def kv_memory_report() -> str:
    import torch

    from llm_service.engine.config import EngineConfig
    from llm_service.engine.models.attention import KVCache
    from llm_service.engine.models.loader import read_spec
    from llm_service.weights import ensure_embedded_checkpoint

    block_size = EngineConfig(model_dir=ensure_embedded_checkpoint()).block_size
    spec = read_spec(ensure_embedded_checkpoint())
    per_block = KVCache.bytes_per_block(spec.num_layers, block_size, spec.num_kv_heads,
                                        spec.head_dim, torch.float32)
    blocks = -(-(PROMPT_LEN + OUTPUT_LEN) // block_size)
    paged = blocks * per_block
    max_len = spec.max_position_embeddings
    contiguous = max_len * per_block // block_size
    mib = 1024**2
    return (f"KV memory per sequence ({PROMPT_LEN}+{OUTPUT_LEN} tokens): paged {paged / mib:.1f} "
            f"MiB ({blocks} blocks of {block_size}) vs a contiguous cache for max_model_len "
            f"{max_len}: {contiguous / mib:.1f} MiB ({contiguous / paged:.0f}x more)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="c = 1, 16; fewer baseline runs")
    parser.add_argument("--concurrency", type=int, nargs="+", help="override the levels")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                        help="skip the TorchEngine bf16 column (needs native bf16 matmuls)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    levels = args.concurrency or ([1, 16] if args.quick else [1, 4, 16, 64])
    prompts = make_prompts(max(levels) * 2 + 2)
    print(f"SmolLM2-135M on CPU, {args.threads} threads; prompts of {PROMPT_LEN - 32}-"
          f"{PROMPT_LEN + 32} tokens, {OUTPUT_LEN} output tokens; c requests arrive together; "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    ours: dict[int, Result] = {}
    ours_bf16: dict[int, Result] = {}
    baselines: dict[str, dict[int, Result]] = {"one-at-a-time": {}, "static batch": {},
                                               "generate_batch": {}}
    for c in levels:
        batch = prompts[c: 2 * c]
        ours[c] = in_fresh_process(measure_engine, batch, args.threads)
        _progress(c, "TorchEngine", ours[c])
        if args.bf16:
            ours_bf16[c] = in_fresh_process(measure_engine, batch, args.threads, "bfloat16")
            _progress(c, "TorchEngine bf16", ours_bf16[c])
        if args.skip_baselines:
            continue
        if c == levels[0]:
            single = prompts[-1:] if args.quick else prompts[-2:]
            baselines["one-at-a-time"] = in_fresh_process(measure_one_at_a_time, single,
                                                          args.threads, levels)
            _progress(c, "one-at-a-time", baselines["one-at-a-time"][c])
        if c > 1 and (c == 16 or not args.quick):
            for name, fn in (("static batch", measure_static_batch),
                             ("generate_batch", measure_generate_batch)):
                baselines[name][c] = in_fresh_process(fn, batch, args.threads)
                _progress(c, name, baselines[name][c])
    print_table(levels, ours, {k: v for k, v in baselines.items() if v}, ours_bf16)
    print(kv_memory_report())
    print(f"load average at end {os.getloadavg()[0]:.1f} (other processes share this CPU)")


def _progress(c: int, name: str, result: Result) -> None:
    print(f"  c={c:<3} {name:<15} {result.tokens_per_s:7.1f} tok/s", flush=True)


def print_table(levels: list[int], ours: dict[int, Result],
                baselines: dict[str, dict[int, Result]],
                ours_bf16: dict[int, Result] | None = None) -> None:
    print()
    print(f"{'c':>3} | {'system':<15} | {'tok/s':>7} | {'TTFT s':>7} | TorchEngine (fp32) "
          f"speed-up")
    for c in levels:
        print(f"{c:>3} | {'TorchEngine':<15} | {ours[c].tokens_per_s:>7.1f} | "
              f"{ours[c].ttft_s:>7.2f} |")
        if ours_bf16 and c in ours_bf16:
            r = ours_bf16[c]
            print(f"{c:>3} | {'TorchEngine bf16':<15} | {r.tokens_per_s:>7.1f} | "
                  f"{r.ttft_s:>7.2f} | bf16 is {r.tokens_per_s / ours[c].tokens_per_s:.2f}x fp32")
        for name, results in baselines.items():
            if c in results:
                r = results[c]
                print(f"{c:>3} | {name:<15} | {r.tokens_per_s:>7.1f} | {r.ttft_s:>7.2f} | "
                      f"{ours[c].tokens_per_s / r.tokens_per_s:.2f}x")


if __name__ == "__main__":
    main()
