"""Structured outputs: throughput with a JSON Schema on every request against none, and the
grammar compile time (first and cached), on TorchEngine with SmolLM2, in one process.

Workload: a closed loop at concurrency c (16): as a request finishes the next one starts, so
the batch stays full; each request is a chat prompt asking for JSON, up to 64 output tokens,
sampled at temperature 1.0. The constrained run gives every request one of the schemas
below (cycled); the unconstrained run sends the same prompts without. The two alternate
`--rounds` times each, so load from other processes hits them alike; reported: output
tokens/s of each and their ratio (the target is >= 0.85). The mask path is timed on its own:
the sampler on 16 rows of logits with and without a grammar state on every row.

    python -m benchmarks.structured                # c = 16, 64 requests a run, 2 rounds
    python -m benchmarks.structured --requests 32 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

STRICT = {"type": "object", "additionalProperties": False}
SCHEMAS = [
    {**STRICT, "required": ["name", "age"], "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
    {**STRICT, "required": ["city", "tags"], "properties": {
        "city": {"type": "string", "maxLength": 24},
        "tags": {"type": "array", "items": {"enum": ["old", "new", "big", "small"]},
                 "minItems": 1, "maxItems": 3}}},
    {**STRICT, "required": ["date", "total"], "properties": {
        "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
        "total": {"type": "number", "minimum": 0, "maximum": 10000},
        "note": {"type": "string", "maxLength": 32}}},
    {**STRICT, "required": ["items"], "properties": {"items": {
        "type": "array", "minItems": 1, "maxItems": 3, "items": {
            **STRICT, "required": ["sku", "qty"], "properties": {
                "sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                "qty": {"type": "integer", "minimum": 1, "maximum": 99}}}}}},
]
TOPICS = ["a person", "a city", "an invoice", "an order", "a book", "a receipt", "a pet",
          "a trip"]
MAX_TOKENS = 64


def prompts(tokenizer, count: int) -> list[list[int]]:
    out = []
    for i in range(count):
        messages = [{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} as JSON "
                                                f"(example {i})."}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) else ids))
    return out


async def run(engine, requests, concurrency: int) -> tuple[int, float]:
    """(output tokens, seconds) for all requests at `concurrency` in flight."""
    queue = list(reversed(requests))
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            request = queue.pop()
            async for out in engine.generate(request):
                tokens += len(out.new_token_ids)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens, time.perf_counter() - started


def compile_times(model_dir: Path, vocab_size: int) -> None:
    from llm_service.engine.grammar import GrammarCompiler, checkpoint_tokenizer
    from llm_service.engine.protocol import StructuredOutput

    started = time.perf_counter()
    tokenizer = checkpoint_tokenizer(model_dir, vocab_size)
    print(f"tokenizer for the grammars: {(time.perf_counter() - started) * 1e3:.0f} ms "
          "(once per engine, at start)")
    compiler = GrammarCompiler(lambda: tokenizer)
    compiled = []
    for i, schema in enumerate(SCHEMAS):
        spec = StructuredOutput("json_schema", json.dumps(schema))
        started = time.perf_counter()
        compiler.compile(spec)
        first = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        compiled.append(compiler.compile(StructuredOutput("json_schema", json.dumps(schema))))
        cached = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        compiled[-1].new_state()
        state = (time.perf_counter() - started) * 1e6
        print(f"schema {i}: compile first {first:6.2f} ms, cached {cached:.3f} ms, "
              f"per-sequence state {state:.0f} us")
    mask_time(compiled, vocab_size)


def mask_time(compiled, vocab_size: int, rows: int = 16, repeats: int = 30) -> None:
    """The sampler's time for one step of `rows` sampled rows, with and without a grammar
    state on each row (the states stay at the start of their grammar)."""
    import torch

    from llm_service.engine.protocol import EngineRequest, SamplingParams
    from llm_service.engine.sampler import Sampler
    from llm_service.engine.sequence import Sequence

    def seqs(with_grammar: bool) -> list[Sequence]:
        return [Sequence(i, EngineRequest(f"m{i}", [1, 2], SamplingParams(seed=i),
                                          eos_token_ids=(2,)), i, 4096,
                         grammar=compiled[i % len(compiled)].new_state() if with_grammar
                         else None) for i in range(rows)]

    logits = torch.randn(rows, vocab_size)
    sampler = Sampler()
    timings: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):  # interleaved, and the fastest of each kept: load only adds
        for with_grammar in (False, True):
            batch = seqs(with_grammar)
            started = time.perf_counter()
            sampler(logits.clone(), batch)
            timings[with_grammar].append((time.perf_counter() - started) * 1e3)
    free, guided = min(timings[False]), min(timings[True])
    print(f"sampler, {rows} rows at temperature 1.0 (fastest of {repeats}): {free:.2f} ms free, "
          f"{guided:.2f} ms with a grammar mask on every row (+{guided - free:.2f} ms a step)")


async def main(args: argparse.Namespace) -> None:
    from llm_service.engine.async_engine import TorchEngine
    from llm_service.engine.config import EngineConfig
    from llm_service.engine.protocol import EngineRequest, SamplingParams, StructuredOutput
    from llm_service.weights import ensure_embedded_checkpoint
    from mmserve.transformers_compat import load_fast_tokenizer

    model_dir = ensure_embedded_checkpoint()
    tokenizer = load_fast_tokenizer(model_dir)
    compile_times(model_dir, len(tokenizer))
    engine = TorchEngine(EngineConfig(model_dir=model_dir, max_num_seqs=args.concurrency))
    await engine.start()
    ids = prompts(tokenizer, args.requests)
    eos = (tokenizer.eos_token_id,)
    specs = [StructuredOutput("json_schema", json.dumps(s)) for s in SCHEMAS]

    def batch(tag: str, constrained: bool) -> list[EngineRequest]:
        return [EngineRequest(f"{tag}-{i}", p, SamplingParams(
            max_tokens=MAX_TOKENS, temperature=1.0, seed=i,
            structured=specs[i % len(specs)] if constrained else None), eos_token_ids=eos)
            for i, p in enumerate(ids)]

    totals = {False: [0, 0.0], True: [0, 0.0]}
    try:
        await run(engine, batch("warm", True)[: args.concurrency], args.concurrency)
        for r in range(args.rounds):
            for constrained in (False, True):
                tokens, seconds = await run(engine, batch(f"{r}-{constrained}", constrained),
                                            args.concurrency)
                totals[constrained][0] += tokens
                totals[constrained][1] += seconds
                print(f"round {r} {'json_schema' if constrained else 'free text  '}: "
                      f"{tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s")
    finally:
        await engine.shutdown()
    free = totals[False][0] / totals[False][1]
    guided = totals[True][0] / totals[True][1]
    print(f"c={args.concurrency}: free text {free:.1f} tok/s, json_schema {guided:.1f} tok/s, "
          f"ratio {guided / free:.2f}x (target >= 0.85x)")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="requests per run")
    parser.add_argument("--rounds", type=int, default=2)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse()))
