"""TorchEngine end to end on a tiny random Llama: outputs, aborts, errors, limits, seeds, n > 1."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest
import torch
from tiny_checkpoints import DIMS, VOCAB

from llm_service.engine.async_engine import TorchEngine, merge_outputs
from llm_service.engine.config import EngineConfig
from llm_service.engine.errors import EngineDead, InvalidRequest, Overloaded
from llm_service.engine.protocol import (
    EmbeddingSpan,
    EngineOutput,
    EngineRequest,
    FinishReason,
    SamplingParams,
    StructuredOutput,
)
from polling import eventually

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture
async def make_engine(tiny_llama):
    engines = []

    async def make(**overrides) -> TorchEngine:
        options = dict(model_dir=tiny_llama.path, block_size=4, kv_cache_bytes=1 << 21,
                       max_num_seqs=8, max_num_batched_tokens=32, placement="thread")
        engine = TorchEngine(EngineConfig(**{**options, **overrides}))
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.shutdown()


async def collect(engine: TorchEngine, request: EngineRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(request)]


def tokens(outputs: list[EngineOutput], index: int = 0) -> list[int]:
    return [t for o in outputs if o.index == index for t in o.new_token_ids]


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(reference, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


class Gate:
    """Stops the engine thread before each step until the test lets one through."""

    def __init__(self, engine: TorchEngine) -> None:
        self._arrived = threading.Semaphore(0)
        self._allowed = threading.Semaphore(0)
        self.closed = True
        inner = engine._core.core.runner.execute

        def execute(step):
            if self.closed:
                self._arrived.release()
                self._allowed.acquire()
            return inner(step)

        engine._core.core.runner.execute = execute

    async def reached(self) -> None:
        assert await asyncio.to_thread(self._arrived.acquire, timeout=10)

    def step(self) -> None:
        self._allowed.release()

    def open(self) -> None:
        self.closed = False
        self._allowed.release()


async def test_concurrent_greedy_requests_match_transformers(make_engine, tiny_llama):
    engine = await make_engine(max_num_batched_tokens=16)
    prompts = [prompt(i, n) for i, n in enumerate((5, 13, 1, 29, 8))]
    results = await asyncio.gather(*(
        collect(engine, EngineRequest(f"r{i}", p, GREEDY)) for i, p in enumerate(prompts)))
    for p, outputs in zip(prompts, results):
        assert tokens(outputs) == hf_greedy(tiny_llama.reference, p, 8)
        assert outputs[-1].finish_reason == FinishReason.LENGTH
        assert (outputs[-1].num_prompt_tokens, outputs[-1].num_output_tokens) == (len(p), 8)
    stats = engine.stats()
    assert (stats.kv_blocks_used, stats.running, stats.waiting) == (0, 0, 0)
    assert stats.kv_blocks_cached > 0 and stats.step_time_ms > 0


async def test_eos_and_stop_tokens_end_a_request(make_engine, tiny_llama):
    engine = await make_engine()
    p = prompt(1, 6)
    expected = hf_greedy(tiny_llama.reference, p, 8)
    outputs = await collect(engine, EngineRequest("a", p, GREEDY, eos_token_ids=(expected[2],)))
    assert tokens(outputs) == expected[:3] and outputs[-1].finish_reason == FinishReason.STOP
    sampling = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(expected[1],))
    outputs = await collect(engine, EngineRequest("b", p, sampling))
    assert tokens(outputs) == expected[:2]


async def test_prefix_cache_skips_a_shared_three_block_prefix(make_engine, tiny_llama):
    engine = await make_engine()
    shared = prompt(2, 12)
    await collect(engine, EngineRequest("a", shared + [7, 8], GREEDY))
    second = shared + [9, 10, 11]
    outputs = await collect(engine, EngineRequest("b", second, GREEDY))
    assert outputs[0].num_cached_tokens == 12  # 3 blocks of 4
    assert tokens(outputs) == hf_greedy(tiny_llama.reference, second, 8)
    assert engine.stats().prefix_hit_rate == pytest.approx(12 / (14 + 15))


def embeds_with_span(reference, ids: list[int], start: int, rows: torch.Tensor) -> torch.Tensor:
    embeds = reference.get_input_embeddings()(torch.tensor([ids])).detach().clone()
    embeds[0, start:start + rows.shape[0]] = rows
    return embeds


async def test_embedding_spans_match_transformers_and_key_the_cache(make_engine, tiny_llama):
    engine = await make_engine(max_num_seqs=4, max_num_batched_tokens=4)  # chunks split the span
    g = torch.Generator().manual_seed(0)
    image_a = torch.randn(8, DIMS["hidden_size"], generator=g)
    image_b = torch.randn(8, DIMS["hidden_size"], generator=g)
    ids = [11, 12] + [300] * 8 + [13, 14, 15]

    async def run(rid, rows, content_hash, extra=()):
        request = EngineRequest(rid, ids + list(extra), GREEDY,
                                spans=(EmbeddingSpan(2, rows, content_hash),))
        return await collect(engine, request)

    ref = tiny_llama.reference
    for rid, rows, key in (("a", image_a, "sha-a"), ("b", image_b, "sha-b")):
        outputs = await run(rid, rows, key)
        expected = ref.generate(inputs_embeds=embeds_with_span(ref, ids, 2, rows),
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=8, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0].tolist()
        assert tokens(outputs) == expected
        assert outputs[0].num_cached_tokens == 0  # a different image never shares blocks
    again = await run("c", image_a, "sha-a", extra=(16, 17))
    assert again[0].num_cached_tokens == 12  # same image, same blocks


async def test_max_tokens_past_the_context_is_clamped(make_engine):
    engine = await make_engine(max_model_len=32)
    outputs = await collect(engine, EngineRequest("a", prompt(3, 29), SamplingParams(
        max_tokens=100, temperature=0.0)))
    assert tokens(outputs).__len__() == 3 and outputs[-1].finish_reason == FinishReason.LENGTH


BAD_REQUESTS = {
    "empty prompt": (EngineRequest("x", []), "empty"),
    "prompt too long": (EngineRequest("x", [1] * 64), "max_model_len is 64"),
    "token outside vocabulary": (EngineRequest("x", [1, VOCAB]), f"token id {VOCAB}"),
    "span out of range": (EngineRequest("x", [1, 2, 3], spans=(
        EmbeddingSpan(2, torch.zeros(2, DIMS["hidden_size"]), "h"),)), r"\[2, 4\)"),
    "span width": (EngineRequest("x", [1, 2, 3], spans=(
        EmbeddingSpan(0, torch.zeros(2, 5), "h"),)), "width 5"),
    "overlapping spans": (EngineRequest("x", [1, 2, 3, 4], spans=(
        EmbeddingSpan(0, torch.zeros(2, DIMS["hidden_size"]), "h"),
        EmbeddingSpan(1, torch.zeros(2, DIMS["hidden_size"]), "i"))), "overlaps"),
    "n above max_num_seqs": (EngineRequest("x", [1], SamplingParams(n=9)), "max_num_seqs=8"),
    "logit_bias outside vocabulary": (EngineRequest("x", [1], SamplingParams(
        logit_bias=((VOCAB, 1.0),))), f"logit_bias: token ids \\[{VOCAB}\\]"),
    # Refused by the core's compile thread (the tiny checkpoint has no tokenizer.json).
    "structured output without a tokenizer": (EngineRequest("x", [1, 2], SamplingParams(
        structured=StructuredOutput("regex", "[0-9]+"))), "structured output"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_requests_raise_on_first_iteration_and_change_nothing(make_engine, case):
    engine = await make_engine(max_model_len=64)
    request, message = BAD_REQUESTS[case]
    before = engine.stats()
    stream = engine.generate(request)
    with pytest.raises(InvalidRequest, match=message):
        await stream.__anext__()
    assert engine.stats() == before
    assert await collect(engine, EngineRequest("x", [1, 2], GREEDY))  # the id is free again


async def test_out_of_vocabulary_ids_are_fine_under_a_span(make_engine):
    engine = await make_engine()
    span = EmbeddingSpan(1, torch.zeros(2, DIMS["hidden_size"]), "h")
    outputs = await collect(engine, EngineRequest("x", [1, -5, VOCAB + 3, 2], GREEDY,
                                                  spans=(span,)))
    assert len(tokens(outputs)) == 8


async def test_a_duplicate_request_id_is_refused(make_engine):
    engine = await make_engine()
    gate = Gate(engine)
    first = engine.generate(EngineRequest("dup", [1, 2, 3], GREEDY))
    task = asyncio.ensure_future(first.__anext__())
    await gate.reached()
    with pytest.raises(InvalidRequest, match="already in use"):
        await engine.generate(EngineRequest("dup", [4], GREEDY)).__anext__()
    gate.open()
    assert (await task).request_id == "dup"
    await first.aclose()


async def test_full_waiting_queue_refuses_with_overloaded(make_engine):
    engine = await make_engine(max_num_seqs=1, max_waiting=1)
    gate = Gate(engine)
    running = asyncio.ensure_future(collect(engine, EngineRequest("a", [1, 2], GREEDY)))
    await gate.reached()  # a is running; the engine holds before its first step
    waiting = asyncio.ensure_future(collect(engine, EngineRequest("b", [3, 4], GREEDY)))
    await eventually(lambda: "b" in engine._streams)
    refused = asyncio.ensure_future(collect(engine, EngineRequest("c", [5, 6], GREEDY)))
    await eventually(lambda: "c" in engine._streams)
    gate.open()
    with pytest.raises(Overloaded, match="max_waiting=1"):
        await refused
    assert len(tokens(await running)) == 8 and len(tokens(await waiting)) == 8


@pytest.mark.parametrize("stage", ["waiting", "mid_prefill", "decoding"])
async def test_abort_at_each_stage_frees_all_blocks(make_engine, stage):
    engine = await make_engine(max_num_seqs=1, max_num_batched_tokens=4)
    gate = Gate(engine)
    holder = None
    if stage == "waiting":  # takes the only running slot
        holder = asyncio.ensure_future(collect(engine, EngineRequest("hold", [1, 2], GREEDY)))
        await eventually(lambda: "hold" in engine._streams)
    target = engine.generate(EngineRequest("t", prompt(4, 10), SamplingParams(max_tokens=50)))
    first = asyncio.ensure_future(target.__anext__())
    await gate.reached()
    # steps of 4 tokens: the 10-token prompt is computed over steps 1-3, decoding follows
    for _ in range({"waiting": 0, "mid_prefill": 1, "decoding": 5}[stage]):
        gate.step()
        await gate.reached()
    if stage != "waiting":
        assert engine.stats().kv_blocks_used > 0
    await engine.abort("t")
    gate.open()
    outputs = [await first] + [out async for out in target]
    assert outputs[-1].finish_reason == FinishReason.ABORT
    assert len(tokens(outputs)) == {"waiting": 0, "mid_prefill": 0, "decoding": 4}[stage]
    if holder is not None:
        await holder
    stats = engine.stats()
    assert (stats.kv_blocks_used, stats.running, stats.waiting) == (0, 0, 0)


async def test_finishing_one_choice_frees_its_blocks_while_its_sibling_decodes(make_engine):
    engine = await make_engine()
    gate = Gate(engine)
    stream = engine.generate(EngineRequest("a", prompt(6, 9), SamplingParams(
        n=2, max_tokens=6, temperature=0.0)))
    first = asyncio.ensure_future(stream.__anext__())
    await gate.reached()  # step 1: the prompt; choice 1 forks at its end
    for _ in range(2):  # step 2: both choices decode; step 3 waits
        gate.step()
        await gate.reached()
    # 4-token blocks: the 9-token prompt's first two shared, one tail block per choice.
    assert engine.stats().kv_blocks_used == 4
    await engine.finish("a", 1)  # as the generator does when choice 1 matched a stop string
    gate.step()
    await gate.reached()  # step 4: choice 0 alone
    assert engine.stats().kv_blocks_used == 3
    gate.open()
    outputs = [await first] + [out async for out in stream]
    finals = {o.index: o for o in outputs if o.finished}
    assert finals[1].finish_reason == FinishReason.STOP and len(tokens(outputs, 1)) == 2
    assert finals[0].finish_reason == FinishReason.LENGTH and len(tokens(outputs, 0)) == 6
    await eventually(lambda: engine.stats().kv_blocks_used == 0)


async def test_closing_the_stream_early_aborts(make_engine):
    engine = await make_engine()
    stream = engine.generate(EngineRequest("a", prompt(5, 9), SamplingParams(max_tokens=200)))
    await stream.__anext__()
    await stream.__anext__()
    await stream.aclose()
    await eventually(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().running == 0)
    assert engine._core.core.scheduler.requests == {}


async def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(make_engine):
    engine = await make_engine()
    inner = engine._core.core.runner.execute
    calls = []

    def execute(step):
        calls.append(step)
        if len(calls) == 2:
            raise RuntimeError("kernel exploded")
        return inner(step)

    engine._core.core.runner.execute = execute
    outputs = await collect(engine, EngineRequest("a", [1, 2, 3], GREEDY))
    assert outputs[-1].finish_reason == FinishReason.ABORT
    assert "kernel exploded" in outputs[-1].error
    assert engine.healthy and engine.stats().kv_blocks_used == 0
    assert len(tokens(await collect(engine, EngineRequest("b", [1, 2, 3], GREEDY)))) == 8


async def test_a_fatal_error_fails_everything_and_marks_the_engine_dead(make_engine):
    engine = await make_engine()

    def broken_update(step, result):
        raise RuntimeError("scheduler state corrupted")

    engine._core.core.scheduler.update = broken_update
    outputs = await collect(engine, EngineRequest("a", [1, 2, 3], SamplingParams(n=2)))
    assert {o.index for o in outputs} == {0, 1}
    assert all(o.finish_reason == FinishReason.ABORT and "corrupted" in o.error for o in outputs)
    await eventually(lambda: not engine.healthy)
    with pytest.raises(EngineDead, match="corrupted"):
        await engine.generate(EngineRequest("b", [1], GREEDY)).__anext__()


async def test_a_seed_gives_the_same_tokens_whatever_the_batch(make_engine):
    engine = await make_engine()
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=1234)
    p = prompt(6, 7)
    alone = tokens(await collect(engine, EngineRequest("alone", p, seeded)))
    mates = [EngineRequest(f"m{i}", prompt(10 + i, 5 + 3 * i), SamplingParams(
        max_tokens=12, temperature=0.7 + 0.2 * i, top_p=0.9)) for i in range(4)]
    results = await asyncio.gather(collect(engine, EngineRequest("crowd", p, seeded)),
                                   *(collect(engine, m) for m in mates))
    assert tokens(results[0]) == alone
    other = SamplingParams(max_tokens=12, temperature=1.0, seed=99)
    assert tokens(await collect(engine, EngineRequest("other", p, other))) != alone


async def test_n_choices_stream_with_their_index(make_engine):
    engine = await make_engine()
    p = prompt(7, 10)
    single = tokens(await collect(engine, EngineRequest("one", p, SamplingParams(
        max_tokens=6, seed=5))))
    outputs = await collect(engine, EngineRequest("three", p, SamplingParams(
        max_tokens=6, seed=5, n=3)))
    choices = [tokens(outputs, i) for i in range(3)]
    assert [len(c) for c in choices] == [6, 6, 6]
    assert choices[0] == single
    assert len({tuple(c) for c in choices}) > 1
    finals = [o for o in outputs if o.finished]
    assert sorted(o.index for o in finals) == [0, 1, 2]
    assert engine.stats().kv_blocks_used == 0


async def test_logprobs_are_the_models(make_engine, tiny_llama):
    engine = await make_engine()
    p = prompt(8, 6)
    outputs = await collect(engine, EngineRequest("a", p, SamplingParams(
        max_tokens=3, temperature=0.0, logprobs=4)))
    with torch.no_grad():
        ids = p + tokens(outputs)
        expected = torch.log_softmax(tiny_llama.reference(torch.tensor([ids])).logits[0], -1)
    # one logprob per token (an output may carry several tokens when the reader lagged)
    entries = [lp for out in outputs for lp in out.logprobs]
    assert len(entries) == len(tokens(outputs)) == 3
    for k, (lp, token) in enumerate(zip(entries, tokens(outputs))):
        row = expected[len(p) - 1 + k]
        assert lp.token_id == token == lp.top[0][0]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == row.topk(4).indices.tolist()


async def test_shutdown_aborts_running_requests(make_engine):
    engine = await make_engine()
    stream = engine.generate(EngineRequest("a", [1, 2], SamplingParams(max_tokens=10_000)))
    await stream.__anext__()
    await engine.shutdown()
    outputs = [out async for out in stream]
    assert outputs[-1].finish_reason == FinishReason.ABORT
    assert not engine.healthy
    with pytest.raises(EngineDead):
        await engine.generate(EngineRequest("b", [1], GREEDY)).__anext__()


async def test_a_missing_checkpoint_fails_start(tmp_path):
    engine = TorchEngine(EngineConfig(model_dir=tmp_path, placement="thread"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        await engine.start()
    assert not engine.healthy
    with pytest.raises(EngineDead, match="failed to start"):
        await engine.generate(EngineRequest("a", [1], GREEDY)).__anext__()
    await engine.shutdown()


# --- the engine in its own process (the default placement) -----------------------------------

async def test_in_its_own_process_the_engine_gives_the_same_tokens(make_engine, tiny_llama):
    engine = await make_engine(placement="process", max_num_batched_tokens=16)
    assert engine._core.process.pid != os.getpid()
    rows = torch.randn(8, DIMS["hidden_size"], generator=torch.Generator().manual_seed(0))
    ids = [11, 12] + [300] * 8 + [13, 14, 15]
    plain = [prompt(i, n) for i, n in enumerate((5, 13, 29))]
    with_span = EngineRequest("span", ids, GREEDY, spans=(EmbeddingSpan(2, rows, "sha-a"),))
    results = await asyncio.gather(
        collect(engine, with_span),
        *(collect(engine, EngineRequest(f"r{i}", p, GREEDY)) for i, p in enumerate(plain)))
    ref = tiny_llama.reference
    expected_span = ref.generate(inputs_embeds=embeds_with_span(ref, ids, 2, rows),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=8, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0].tolist()
    assert tokens(results[0]) == expected_span  # the rows crossed into the process intact
    for p, outputs in zip(plain, results[1:]):
        assert tokens(outputs) == hf_greedy(ref, p, 8)
    stats = engine.stats()
    assert (stats.kv_blocks_used, stats.running, stats.waiting) == (0, 0, 0)
    assert stats.kv_blocks_total > 0 and stats.step_time_ms > 0


async def test_in_its_own_process_an_abort_frees_the_blocks(make_engine):
    engine = await make_engine(placement="process")
    stream = engine.generate(EngineRequest("a", prompt(5, 9), SamplingParams(max_tokens=10_000)))
    await stream.__anext__()
    await stream.aclose()
    await eventually(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().running == 0)
    assert len(tokens(await collect(engine, EngineRequest("b", [1, 2, 3], GREEDY)))) == 8


async def test_a_killed_engine_process_fails_its_requests_and_the_engine(make_engine):
    engine = await make_engine(placement="process")
    stream = engine.generate(EngineRequest("a", [1, 2], SamplingParams(max_tokens=10_000)))
    await stream.__anext__()
    os.kill(engine._core.process.pid, signal.SIGKILL)
    outputs = [out async for out in stream]
    assert outputs[-1].finish_reason == FinishReason.ABORT
    assert "engine process exited" in outputs[-1].error
    assert not engine.healthy
    with pytest.raises(EngineDead, match="exited"):
        await engine.generate(EngineRequest("b", [1], GREEDY)).__anext__()


async def test_in_its_own_process_a_bad_checkpoint_fails_start(tmp_path):
    engine = TorchEngine(EngineConfig(model_dir=tmp_path, placement="process"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        await engine.start()
    assert not engine.healthy
    await engine.shutdown()


def test_merged_outputs_keep_each_choice_in_order():
    out = lambda index, token, finish=None, n=1: EngineOutput(  # noqa: E731
        "r", index, [token], finish, num_output_tokens=n)
    merged = merge_outputs([out(0, 5, n=1), out(1, 7, n=1), out(0, 6, n=2),
                            out(1, 8, FinishReason.STOP, n=2)])
    assert [(m.index, m.new_token_ids, m.finish_reason, m.num_output_tokens) for m in merged] == [
        (0, [5, 6], None, 2), (1, [7, 8], FinishReason.STOP, 2)]


async def test_a_reader_that_falls_behind_gets_the_same_tokens_in_fewer_outputs(make_engine):
    engine = await make_engine(placement="process")
    p = prompt(12, 6)
    sampling = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompt_only = tokens(await collect(engine, EngineRequest("fast", p, sampling)))
    slow = []
    async for out in engine.generate(EngineRequest("slow", p, sampling)):
        slow.append(out)
        await asyncio.sleep(0.05)  # a congested client: the engine runs ahead
    assert tokens(slow) == prompt_only
    assert len(slow) < 40 and max(len(o.new_token_ids) for o in slow) > 1
    assert slow[-1].num_output_tokens == 40 and slow[-1].finish_reason == FinishReason.LENGTH


async def test_the_warm_up_at_start_leaves_nothing_behind(make_engine):
    engine = await make_engine()
    core = engine._core.core
    assert core.config.warm_up and core.scheduler.requests == {}
    assert core.scheduler.block_manager.num_used_blocks == 0
    assert core.scheduler.block_manager.num_cached_free > 0  # it did run
    stats = core.stats()
    assert (stats.kv_blocks_used, stats.running, stats.waiting, stats.num_preemptions) == (
        0, 0, 0, 0)
    assert stats.prefix_hit_rate == 0.0 and core.scheduler.num_queried_tokens == 0
    assert len(tokens(await collect(engine, EngineRequest("a", [1, 2, 3], GREEDY)))) == 8


async def test_the_warm_up_fits_a_context_shorter_than_its_prompts(make_engine):
    engine = await make_engine(max_model_len=20)
    core = engine._core.core
    assert core.scheduler.requests == {} and core.scheduler.block_manager.num_cached_free > 0
    assert len(tokens(await collect(engine, EngineRequest("a", [1, 2, 3], GREEDY)))) == 8
