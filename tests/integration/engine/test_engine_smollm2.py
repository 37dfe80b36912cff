"""SmolLM2-135M through TorchEngine: greedy tokens identical to transformers, one by one."""

from __future__ import annotations

import asyncio

import pytest

from llm_service.engine.async_engine import TorchEngine
from llm_service.engine.config import EngineConfig
from llm_service.engine.protocol import EmbeddingSpan, EngineRequest, SamplingParams

from conftest import EOS, MAX_NEW_TOKENS, Case

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
    params = SamplingParams(**{"max_tokens": MAX_NEW_TOKENS, "temperature": 0.0, **sampling})
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
    """bf16 (packed weights, bf16 KV cache) against fp32's greedy tokens on the test prompts.
    Exact equality is not expected. Two measures:
    - forced: given fp32's tokens so far, bf16's next token is fp32's; per position, so one
      early difference does not decide the rest. Measured on AVX-512 BF16: 129 of 135 with
      prompt attention in mmserve::paged_decode (the default), 132 with torch's SDPA.
    - free-running: the tokens before each answer's first difference. Once an answer
      differs it goes its own way, so this swings with any change of rounding: 81 of 135
      and 4 of 10 answers whole with the kernel, 98 and 6 with SDPA, though over the
      positions of five longer prompts the kernel was as close to fp32 as SDPA (top-1
      agreement 98.2% vs 97.5%, KL 0.0013 both).
    Held: 90% forced, and 50% of the free-running tokens."""
    engine = TorchEngine(EngineConfig(model_dir=smollm2.path, dtype="bfloat16"))
    await engine.start()
    try:
        assert engine.dtype == "bfloat16"
        results = await asyncio.gather(*(
            generate(engine, request(f"r{i}", case)) for i, case in enumerate(cases)))
        forced = await asyncio.gather(*(
            generate(engine, request(f"f{i}-{k}", Case(case.ids + case.expected[:k], case.span,
                                                       case.expected[k: k + 1]), max_tokens=1))
            for i, case in enumerate(cases) for k in range(len(case.expected))))
    finally:
        await engine.shutdown()
    agreed = []
    for case, (tokens, _) in zip(cases, results):
        same = next((i for i, (a, b) in enumerate(zip(tokens, case.expected)) if a != b),
                    min(len(tokens), len(case.expected)))
        agreed.append(same)
    expected_next = [t for case in cases for t in case.expected]
    forced_same = sum(tokens == [t] for (tokens, _), t in zip(forced, expected_next))
    print(f"bf16 vs fp32 greedy: forced {forced_same} of {len(expected_next)}; free-running, "
          f"tokens agreeing before the first difference {agreed} "
          f"of {[len(c.expected) for c in cases]}")
    assert forced_same >= 0.9 * len(expected_next)
    assert sum(agreed) >= 0.5 * sum(len(c.expected) for c in cases)
