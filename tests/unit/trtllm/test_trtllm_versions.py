"""TensorRT-LLM version handling, against the fake in its 1.2, older (0.13) and post-1.2 flavours:
start-up refusals, requests needing what a binding lacks, the extra-ids rule, n > 1 and the
queue, and prompt tables that stay in host memory."""

from __future__ import annotations

import asyncio
import sys

import pytest
import torch

from llm_service.engine.protocol import EmbeddingSpan, EngineRequest, FinishReason, SamplingParams
from llm_service.engine.trtllm import TrtllmEngine
from llm_service.engine.trtllm.bindings import load_bindings
from llm_service.errors import InvalidRequest, Overloaded

pytestmark = pytest.mark.timeout(30)

PROMPT = [11, 12, 13, 14, 15]


async def collect(engine, request):
    return [out async for out in engine.generate(request)]


def media_request(name: str, n: int = 1) -> EngineRequest:
    span = EmbeddingSpan(2, torch.randn(6, 16), "sha256:x")
    return EngineRequest(name, [11, 12, *[7] * 6, 13], SamplingParams(max_tokens=3, n=n,
                                                                     temperature=0.7),
                         spans=(span,))


# --- start-up ---

def test_a_tensorrt_llm_without_the_executor_is_refused_naming_the_supported_line(
        fake_flavour, engine_dir):
    assert not hasattr(fake_flavour("1.3.0"), "Executor")
    with pytest.raises(ValueError) as error:
        TrtllmEngine.from_options(engine_dir, {})
    message = str(error.value)
    assert "\n" not in message
    assert "tensorrt_llm 1.3.0 does not have" in message and "1.2.x" in message
    assert "release:1.2.1" in message


def test_a_missing_executor_module_is_refused_the_same_way(fake_flavour, monkeypatch):
    fake_flavour("1.2.1")
    monkeypatch.setitem(sys.modules, "tensorrt_llm.bindings.executor", None)
    with pytest.raises(ValueError, match=r"C\+\+ executor, which tensorrt_llm 1.2.1 does not"):
        load_bindings()


def test_no_tensorrt_llm_names_the_package_and_the_image(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(ValueError, match=r"needs the tensorrt_llm package \(NVIDIA TensorRT-LLM "
                                         r"1\.2\.x\).*release:1\.2\.1"):
        load_bindings()


def test_another_line_with_the_executor_starts_with_a_warning(fake_flavour, caplog):
    fake_flavour("0.13.0")
    assert hasattr(load_bindings(), "Executor")
    assert "tested with the 1.2.x line only" in caplog.text


# --- what an older binding lacks is a 400 ---

async def test_older_binding_refuses_n_and_min_p_and_still_serves_the_rest(fake_flavour, start):
    tle = fake_flavour("0.13.0")
    engine, fake = await start()
    with pytest.raises(InvalidRequest, match=r"n = 2 .*TensorRT-LLM 0\.13\.0 .*1\.2\.x.*n = 1"):
        await collect(engine, EngineRequest("n", PROMPT, SamplingParams(n=2, temperature=0.7)))
    with pytest.raises(InvalidRequest, match=r"min_p is not available .*without min_p"):
        await collect(engine, EngineRequest("p", PROMPT, SamplingParams(temperature=0.7,
                                                                         min_p=0.1)))
    outputs = await collect(engine, EngineRequest("a", PROMPT, SamplingParams(max_tokens=4)))
    assert [t for out in outputs for t in out.new_token_ids] == [11, 12, 13, 14]
    assert outputs[-1].finish_reason == FinishReason.LENGTH  # inferred: NOT_FINISHED, 4 tokens
    sent = fake.requests[1]
    assert not hasattr(sent.output_config, "return_perf_metrics")
    assert not hasattr(tle.FinishReason, "CANCELLED")
    aborted = engine.generate(EngineRequest("b", PROMPT, SamplingParams(max_tokens=200)))
    await aborted.__anext__()
    await engine.abort("b")
    assert [out async for out in aborted][-1].finish_reason == FinishReason.ABORT


async def test_the_1_2_binding_takes_n_and_min_p(start):
    engine, fake = await start()
    outputs = await collect(engine, EngineRequest("a", PROMPT, SamplingParams(
        max_tokens=2, n=2, temperature=0.7, min_p=0.1)))
    assert sorted(out.index for out in outputs if out.finished) == [0, 1]
    sampling = fake.requests[1].sampling_config
    assert (sampling.num_return_sequences, sampling.min_p) == (2, 0.1)


# --- extra ids ---

def test_the_fake_fails_a_prompt_table_without_extra_ids_when_blocks_are_reused(tle, engine_dir):
    from datetime import timedelta

    def run(reuse: bool):
        executor = tle.Executor(engine_dir, tle.ModelType.DECODER_ONLY, tle.ExecutorConfig(
            kv_cache_config=tle.KvCacheConfig(enable_block_reuse=reuse)))
        table = torch.zeros(2, 16, dtype=torch.float16)
        request = tle.Request([1, 1000, 1001, 2], 2, streaming=True,
                              prompt_tuning_config=tle.PromptTuningConfig(table))
        executor.enqueue_request(request)
        (response,) = executor.await_responses(timeout=timedelta(seconds=1))
        executor.shutdown()
        return response

    refused = run(reuse=True)
    assert refused.has_error() and refused.error_msg == (
        "Input token extra ids must be provided when enabling kv cache reuse with prompt table")
    assert not run(reuse=False).has_error()


async def test_media_requests_carry_extra_ids_so_reuse_stays_on(start):
    engine, fake = await start()
    assert fake.config.kv_cache_config.enable_block_reuse is True
    outputs = await collect(engine, media_request("m"))
    assert outputs[-1].error is None and outputs[-1].finish_reason == FinishReason.LENGTH
    extra = fake.requests[1].prompt_tuning_config.input_token_extra_ids
    assert len(extra) == 9 and extra[:2] == [0, 0] and len(set(extra[2:8])) == 1 and extra[2]


# --- n > 1 and the queue ---

async def test_n_choices_count_against_the_queue(start):
    engine, fake = await start(max_queue_size=4, max_num_seqs=1)
    running = engine.generate(EngineRequest("a", PROMPT, SamplingParams(max_tokens=200)))
    await running.__anext__()  # "a" holds the only batch slot; everything else queues
    waiting = [asyncio.ensure_future(engine.generate(EngineRequest(
        "b", PROMPT, SamplingParams(n=3, temperature=0.7))).__anext__())]
    await asyncio.sleep(0.05)
    # queued: one request; the next one needs 1 + 2 children: 1 + 3 = 4 places fit ...
    waiting.append(asyncio.ensure_future(engine.generate(EngineRequest(
        "c", PROMPT, SamplingParams(n=3, temperature=0.7))).__anext__()))
    await asyncio.sleep(0.05)
    # ... now 2 queued + 3 > 4
    with pytest.raises(Overloaded, match="Maximum queue size of 4"):
        await collect(engine, EngineRequest("d", PROMPT, SamplingParams(n=3, temperature=0.7)))
    for future in waiting:
        future.cancel()
    await running.aclose()


async def test_more_choices_than_the_queue_holds_is_a_400(start):
    engine, _ = await start(max_queue_size=4)
    with pytest.raises(InvalidRequest, match=r"n = 5 choices take 5 places .*holds 4"):
        await collect(engine, EngineRequest("a", PROMPT, SamplingParams(n=5, temperature=0.7)))


# --- prompt tables stay on the host ---

async def test_prompt_tables_are_host_tensors_kept_until_the_request_ends(start):
    engine, fake = await start()
    outputs = engine.generate(media_request("m"))
    await outputs.__anext__()
    table = fake.requests[1].prompt_tuning_config.embedding_table
    assert table.device.type == "cpu" and table.dtype == torch.float16
    assert engine._streams["m"].table is table  # referenced while the executor may copy it
    rest = [out async for out in outputs]
    assert rest[-1].finished and "m" not in engine._streams


async def test_tables_are_pinned_where_cuda_is_present(start, monkeypatch):
    pinned = []

    def pin_memory(self):
        pinned.append(self)
        return self

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    engine, fake = await start()
    await collect(engine, media_request("m"))
    assert pinned == [fake.requests[1].prompt_tuning_config.embedding_table]
