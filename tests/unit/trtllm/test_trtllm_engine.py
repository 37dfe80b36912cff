"""TrtllmEngine against the fake executor: streaming, stops, cancel, errors, stats, shutdown."""

from __future__ import annotations

import asyncio

import pytest
import torch

from llm_service.engine.errors import EngineDead, InvalidRequest, Overloaded, Unavailable
from llm_service.engine.protocol import EmbeddingSpan, EngineRequest, FinishReason, SamplingParams
from polling import eventually

pytestmark = pytest.mark.timeout(30)

PROMPT = [11, 12, 13, 14, 15]


@pytest.fixture
def make_engine(start):
    return start


async def collect(engine, request):
    return [out async for out in engine.generate(request)]


def tokens(outputs, index=0):
    return [t for out in outputs if out.index == index for t in out.new_token_ids]


async def test_executor_is_configured_from_the_options(make_engine, tle):
    engine, fake = await make_engine(free_gpu_memory_fraction=0.5, kv_cache_max_tokens=4096,
                                     enable_block_reuse=False, host_cache_size=1 << 30,
                                     scheduler_policy="max_utilization", max_queue_size=8,
                                     max_num_seqs=2)
    config = fake.config
    assert fake.model_type == tle.ModelType.DECODER_ONLY
    kv = config.kv_cache_config
    assert (kv.free_gpu_memory_fraction, kv.max_tokens, kv.enable_block_reuse,
            kv.host_cache_size) == (0.5, 4096, False, 1 << 30)
    policy = config.scheduler_config.capacity_scheduler_policy
    assert policy == tle.CapacitySchedulerPolicy.MAX_UTILIZATION
    assert config.enable_chunked_context is True
    assert (config.max_queue_size, config.max_batch_size, config.batching_type) == (
        8, 2, tle.BatchingType.INFLIGHT)
    assert (engine.vocab_size, engine.hidden_size, engine.max_model_len) == (1000, 16, 320)


async def test_streams_deltas_until_length(make_engine):
    engine, _ = await make_engine()
    outputs = await collect(engine, EngineRequest("a", PROMPT, SamplingParams(max_tokens=7)))
    assert tokens(outputs) == [11, 12, 13, 14, 15, 11, 12]
    assert len(outputs) == 7 and all(len(out.new_token_ids) == 1 for out in outputs)
    assert [out.finish_reason for out in outputs] == [None] * 6 + [FinishReason.LENGTH]
    assert outputs[-1].num_output_tokens == 7 and outputs[-1].num_prompt_tokens == 5


async def test_streaming_equals_non_streaming(make_engine):
    request = EngineRequest("a", PROMPT, SamplingParams(max_tokens=12), eos_token_ids=(14,))
    streamed = await collect((await make_engine())[0], request)
    whole = await collect((await make_engine(streaming=False))[0], request)
    assert len(whole) == 1 and len(streamed) > 1
    assert tokens(streamed) == tokens(whole) == [11, 12, 13]
    assert streamed[-1].finish_reason == whole[-1].finish_reason == FinishReason.STOP


async def test_eos_stops_without_the_eos_token_and_ignore_eos_runs_on(make_engine):
    engine, _fake = await make_engine()
    stopped = await collect(engine, EngineRequest("a", PROMPT, SamplingParams(max_tokens=9),
                                                  eos_token_ids=(13,)))
    assert tokens(stopped) == [11, 12] and stopped[-1].finish_reason == FinishReason.STOP
    ignored = await collect(engine, EngineRequest("b", PROMPT, SamplingParams(max_tokens=4)))
    assert tokens(ignored) == [11, 12, 13, 14] and ignored[-1].finish_reason == FinishReason.LENGTH


async def test_stop_token_ids_stop_generation(make_engine):
    engine, fake = await make_engine()
    sp = SamplingParams(max_tokens=9, stop_token_ids=(14,))
    outputs = await collect(engine, EngineRequest("a", PROMPT, sp, eos_token_ids=(2, 3)))
    assert tokens(outputs) == [11, 12, 13, 14] and outputs[-1].finish_reason == FinishReason.STOP
    assert fake.requests[1].stop_words == [[3], [14]]


async def test_n_choices_finish_independently(make_engine):
    engine, _ = await make_engine()
    sp = SamplingParams(max_tokens=3, temperature=0.8, n=2)
    outputs = await collect(engine, EngineRequest("a", PROMPT, sp))
    assert tokens(outputs, 0) == [11, 12, 13] and tokens(outputs, 1) == [12, 13, 14]
    finals = [out for out in outputs if out.finished]
    assert sorted(out.index for out in finals) == [0, 1]


async def test_abort_cancels_and_frees_the_request(make_engine):
    engine, fake = await make_engine()
    outputs = engine.generate(EngineRequest("a", PROMPT, SamplingParams(max_tokens=200)))
    first = await outputs.__anext__()
    assert first.new_token_ids == [11]
    await engine.abort("a")
    rest = [out async for out in outputs]
    assert rest[-1].finish_reason == FinishReason.ABORT
    await eventually(lambda: not fake.active_ids())
    await eventually(lambda: engine.stats().running == 0)
    assert len(tokens([first, *rest])) < 200


async def test_closing_the_iterator_cancels(make_engine):
    engine, fake = await make_engine()
    outputs = engine.generate(EngineRequest("a", PROMPT, SamplingParams(max_tokens=200)))
    await outputs.__anext__()
    await outputs.aclose()
    await eventually(lambda: not fake.active_ids())
    await engine.abort("a")  # unknown by now: a no-op


async def test_media_prompt_table_reaches_the_executor(make_engine, tle):
    engine, fake = await make_engine()
    embeddings = torch.randn(6, 16)
    prompt = [11, 12, 7, 7, 7, 7, 7, 7, 13]
    request = EngineRequest("a", prompt, SamplingParams(max_tokens=3),
                            spans=(EmbeddingSpan(2, embeddings, "sha256:x"),))
    outputs = await collect(engine, request)
    sent = fake.requests[1]
    assert sent.input_token_ids == [11, 12, *range(1000, 1006), 13]
    assert sent.prompt_tuning_config.embedding_table.dtype == torch.float16
    assert outputs[-1].finish_reason == FinishReason.LENGTH


async def test_kv_blocks_are_reused_for_the_same_image_only(make_engine):
    engine, fake = await make_engine()
    image_a, image_b = torch.randn(8, 16), torch.randn(8, 16)

    def request(name, embeddings, digest):
        # the image opens the prompt, so every full block depends on it
        return EngineRequest(name, [7] * 8 + [11, 12, 13, 14], SamplingParams(max_tokens=1),
                             spans=(EmbeddingSpan(0, embeddings, digest),))

    for name, embeddings, digest in [("1", image_a, "sha256:a"), ("2", image_a, "sha256:a"),
                                     ("3", image_b, "sha256:b")]:
        await collect(engine, request(name, embeddings, digest))
    assert [fake.reused_by_request[i] for i in (1, 2, 3)] == [0, 3, 0]
    await eventually(lambda: engine.stats().prefix_hit_rate > 0)
    stats = engine.stats()
    assert stats.kv_blocks_total == 64 and stats.block_size == 4
    assert stats.prefix_hit_rate == pytest.approx(3 / 9)


async def test_prompt_tokens_in_reused_blocks_are_reported_as_cached(make_engine):
    engine, _ = await make_engine()
    prompt = list(range(20, 31))  # 11 tokens: two full blocks of 4, then 3 more
    first = await collect(engine, EngineRequest("1", prompt, SamplingParams(max_tokens=2)))
    second = await collect(engine, EngineRequest("2", prompt, SamplingParams(max_tokens=2)))
    assert {out.num_cached_tokens for out in first} == {0}
    assert second[-1].num_cached_tokens == 8


async def test_higher_priority_is_admitted_first(make_engine):
    engine, fake = await make_engine(max_num_seqs=1)
    fake.step_time_s = 0.01
    running = asyncio.create_task(collect(engine, EngineRequest("busy", PROMPT,
                                                                SamplingParams(max_tokens=20))))
    await eventually(lambda: fake.active_ids() == [1])
    order: list[str] = []

    async def record(name: str, priority: int) -> None:
        await collect(engine, EngineRequest(name, PROMPT, SamplingParams(max_tokens=1),
                                            priority=priority))
        order.append(name)

    await asyncio.gather(record("low", -5), record("default", 0), record("high", 5))
    await running
    assert order == ["high", "default", "low"]


async def test_too_many_rows_are_refused_before_the_executor(make_engine):
    engine, fake = await make_engine()
    span = EmbeddingSpan(0, torch.randn(65, 16), "sha256:big")
    with pytest.raises(InvalidRequest, match="65 embedding rows"):
        await collect(engine, EngineRequest("a", [7] * 65 + [11], spans=(span,)))
    assert fake.requests == {}


async def test_executor_error_reaches_the_caller_with_its_message(make_engine):
    engine, fake = await make_engine()
    outputs = engine.generate(EngineRequest("a", PROMPT, SamplingParams(max_tokens=50)))
    await outputs.__anext__()
    fake.inject_error("CUDA error: an illegal memory access")
    rest = [out async for out in outputs]
    assert rest[-1].finish_reason == FinishReason.ABORT
    assert rest[-1].error == "CUDA error: an illegal memory access"
    assert engine.healthy


async def test_full_queue_is_overloaded_and_rejections_are_unavailable(make_engine, monkeypatch):
    engine, fake = await make_engine(max_queue_size=1, max_num_seqs=1)
    running = engine.generate(EngineRequest("a", PROMPT, SamplingParams(max_tokens=200)))
    await running.__anext__()  # "a" holds the only batch slot
    queued = engine.generate(EngineRequest("b", PROMPT))
    waiting = asyncio.ensure_future(queued.__anext__())
    await eventually(lambda: len(fake.active_ids()) == 2)
    with pytest.raises(Overloaded, match="Maximum queue size of 1"):
        await collect(engine, EngineRequest("c", PROMPT))
    waiting.cancel()
    await running.aclose()

    def refuse(request):
        raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: bad request\nstack trace")

    monkeypatch.setattr(fake, "enqueue_request", lambda request: refuse(request))
    with pytest.raises(Unavailable, match=r"rejected the request: .*bad request$"):
        await collect(engine, EngineRequest("c", PROMPT))


async def test_executor_failure_marks_the_engine_dead(make_engine):
    engine, fake = await make_engine()
    outputs = engine.generate(EngineRequest("a", PROMPT, SamplingParams(max_tokens=200)))
    await outputs.__anext__()
    fake.crash("NCCL failure")
    rest = [out async for out in outputs]
    assert rest[-1].finish_reason == FinishReason.ABORT and "NCCL failure" in rest[-1].error
    assert not engine.healthy
    with pytest.raises(EngineDead, match="NCCL failure"):
        await collect(engine, EngineRequest("b", PROMPT))


async def test_shutdown_aborts_running_requests_and_returns(make_engine):
    engine, fake = await make_engine()
    outputs = engine.generate(EngineRequest("a", PROMPT, SamplingParams(max_tokens=200)))
    await outputs.__anext__()
    await asyncio.wait_for(engine.shutdown(), 5)
    rest = [out async for out in outputs]
    assert rest[-1].finish_reason == FinishReason.ABORT
    assert fake.is_shutdown
    with pytest.raises(Unavailable):
        await collect(engine, EngineRequest("b", PROMPT))



