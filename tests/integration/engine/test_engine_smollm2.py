"""SmolLM2-135M through TorchEngine: greedy tokens identical to transformers, one by one."""

from __future__ import annotations

import asyncio

import pytest

from llm_service.engine.async_engine import TorchEngine
from llm_service.engine.config import EngineConfig
from llm_service.engine.protocol import EmbeddingSpan, EngineRequest, SamplingParams

from conftest import EOS, MAX_NEW_TOKENS

pytestmark = pytest.mark.slow

BYTES_PER_BLOCK = 30 * 2 * 16 * 3 * 64 * 4  # layers * (K, V) * block * kv heads * head dim * fp32

# 16-token blocks: small enough that preemption and prefix reuse happen at these sizes
CONFIGS = {
    "default": {"block_size": 16},
    "chunked_prefill": {"block_size": 16, "max_num_batched_tokens": 16, "max_num_seqs": 10},
    "preemption": {"block_size": 16, "kv_cache_bytes": 14 * BYTES_PER_BLOCK},  # 224 of ~700
}


def request(rid: str, case, **sampling) -> EngineRequest:
    spans = ()
    if case.span is not None:
        start, rows = case.span
        spans = (EmbeddingSpan(start, rows, content_hash=f"sha256:{rid}"),)
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, **sampling)
    return EngineRequest(rid, case.ids, params, spans=spans, eos_token_ids=(EOS,))


async def generate(engine: TorchEngine, req: EngineRequest):
    outputs = [out async for out in engine.generate(req)]
    return [t for out in outputs for t in out.new_token_ids], outputs


@pytest.mark.parametrize("config", list(CONFIGS))
async def test_concurrent_requests_match_transformers(smollm2, cases, config):
    engine = TorchEngine(EngineConfig(model_dir=smollm2.path, **CONFIGS[config]))
    await engine.start()
    try:
        results = await asyncio.gather(*(
            generate(engine, request(f"r{i}", case)) for i, case in enumerate(cases)))
        for case, (tokens, _) in zip(cases, results):
            assert tokens == case.expected
        if config == "preemption":
            assert engine.stats().num_preemptions > 0
        stats = engine.stats()
        assert (stats.kv_blocks_used, stats.running, stats.waiting) == (0, 0, 0)
    finally:
        await engine.shutdown()


async def test_the_second_turn_reuses_the_first_turns_blocks(smollm2, cases):
    engine = TorchEngine(EngineConfig(model_dir=smollm2.path, block_size=16))
    await engine.start()
    try:
        first = cases[0]
        await generate(engine, request("turn1", first))
        follow_up = smollm2.tokenizer.encode("<|im_end|>\n<|im_start|>user\nAnd of Italy?"
                                             "<|im_end|>\n<|im_start|>assistant\n")
        ids = first.ids + first.expected + follow_up
        tokens, outputs = await generate(engine, EngineRequest(
            "turn2", ids, SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0),
            eos_token_ids=(EOS,)))
        assert tokens == smollm2.greedy(ids)
        shared = len(first.ids) + len(first.expected) - 1  # the last answer token has no KV
        assert outputs[0].num_cached_tokens == shared // 16 * 16 > 0
    finally:
        await engine.shutdown()


async def test_bf16_greedy_agrees_with_fp32(smollm2, cases):
    """bf16 (packed weights, bf16 KV cache) against fp32 on the test prompts. Exact equality
    is not expected. Measured on AVX-512 BF16: with oneDNN's packed weights 6 of the 10
    answers equal over all their tokens and 106 of 135 tokens equal before each answer's
    first difference (78%); with panel_linear (the default there) 7 of 10 and 98 of 135
    (73%). Held: half the answers equal, and 70% of the tokens."""
    engine = TorchEngine(EngineConfig(model_dir=smollm2.path, dtype="bfloat16"))
    await engine.start()
    try:
        assert engine.dtype == "bfloat16"
        results = await asyncio.gather(*(
            generate(engine, request(f"r{i}", case)) for i, case in enumerate(cases)))
    finally:
        await engine.shutdown()
    agreed = []
    for case, (tokens, _) in zip(cases, results):
        same = next((i for i, (a, b) in enumerate(zip(tokens, case.expected)) if a != b),
                    min(len(tokens), len(case.expected)))
        agreed.append(same)
    print(f"bf16 vs fp32 greedy: tokens agreeing before the first difference {agreed} "
          f"of {[len(c.expected) for c in cases]}")
    assert sum(n == len(c.expected) for n, c in zip(agreed, cases)) >= len(cases) // 2
    assert sum(agreed) >= 0.7 * sum(len(c.expected) for c in cases)
