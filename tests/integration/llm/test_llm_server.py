"""The LLM servicer over real gRPC (port 0) with a scripted engine and the real tokenizer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from llm_service.engine.protocol import (
    EngineClient,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
)
from llm_service.errors import Overloaded
from llm_service.generator import Generator
from llm_service.prompt.families import load_family
from llm_service.server import LLMServicer, build_server
from protos import common_pb2, llm_pb2, llm_pb2_grpc
from polling import eventually

ANSWER = "北京是中国的首都。 The capital of France is Paris."


class ScriptedEngine(EngineClient):
    """Streams a fixed answer one token per step; records requests and aborts."""

    hidden_size, vocab_size, max_model_len = 576, 49152, 8192

    def __init__(self, tokenizer, delay: float = 0.0) -> None:
        self.answer_ids = tokenizer.encode(ANSWER, add_special_tokens=False)
        self.delay = delay
        self.requests: list[EngineRequest] = []
        self.aborted: list[str] = []
        self.finished: list[tuple[str, int]] = []
        self.active: set[str] = set()
        self.refuse = False
        # When set, every sequence waits on this between tokens instead of its own sleep: the
        # sequences then step together, as an engine's batch does.
        self.step: Callable[[], Awaitable[None]] | None = None

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if self.refuse:
            raise Overloaded("waiting queue is full (2 requests)")
        self.requests.append(request)
        self.active.add(request.request_id)
        limit = request.sampling.max_tokens
        ids = self.answer_ids[:limit]
        try:
            for i, token in enumerate(ids):
                await (self.step() if self.step else asyncio.sleep(self.delay))
                last = i == len(ids) - 1
                finish = None
                if last:
                    finish = FinishReason.LENGTH if limit <= len(self.answer_ids) else FinishReason.STOP
                for index in range(request.sampling.n):
                    yield EngineOutput(request.request_id, index, [token], finish,
                                       len(request.prompt_token_ids), i + 1, 3)
        finally:
            if request.request_id in self.active:
                self.active.discard(request.request_id)
                self.aborted.append(request.request_id)

    async def finish(self, request_id: str, index: int) -> None:
        self.finished.append((request_id, index))

    async def abort(self, request_id: str) -> None:
        self.active.discard(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(kv_blocks_total=10, running=len(self.active))

    @property
    def healthy(self) -> bool:
        return True


@contextlib.asynccontextmanager
async def scripted_server(tokenizer):
    """An LLM server on the scripted engine: (engine, server, channel to it)."""
    engine = ScriptedEngine(tokenizer)
    family = load_family("smollm2", tokenizer)
    generator = Generator(engine, tokenizer, family, None)
    servicer = LLMServicer(generator, engine, dict(model_id="m", family="smollm2"))
    server = build_server(servicer)
    port = await server.start("127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield engine, server, channel
    finally:
        await channel.close()
        await server.stop(0)


@pytest.fixture
async def served(smollm2_tokenizer):
    async with scripted_server(smollm2_tokenizer) as (engine, _, channel):
        yield engine, llm_pb2_grpc.LLMStub(channel)


def chat(text: str, **sampling) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(
        request_id="req-1",
        messages=llm_pb2.Messages(messages=[llm_pb2.ChatMessage(
            role="user", content=[llm_pb2.ContentPart(text=text)])]),
        sampling=llm_pb2.SamplingParams(**sampling))


async def collect(stub, request):
    return [r async for r in stub.Generate(request)]


async def test_streams_byte_correct_text_and_usage(served, smollm2_tokenizer):
    engine, stub = served
    replies = await collect(stub, chat("Hi", max_tokens=200, temperature=0.0))
    assert "".join(r.text for r in replies) == ANSWER
    assert all("\ufffd" not in r.text for r in replies)
    last = replies[-1]
    assert last.finish_reason == llm_pb2.FINISH_REASON_STOP
    request = engine.requests[0]
    assert last.usage.prompt_tokens == len(request.prompt_token_ids)
    assert last.usage.completion_tokens == len(engine.answer_ids)
    assert request.sampling.greedy
    assert smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>") in request.eos_token_ids


async def test_stop_string_ends_the_choice_and_aborts_the_engine(served):
    engine, stub = served
    replies = await collect(stub, chat("Hi", max_tokens=200, stop=["France"]))
    assert "".join(r.text for r in replies) == "北京是中国的首都。 The capital of "
    assert replies[-1].finish_reason == llm_pb2.FINISH_REASON_STOP
    assert engine.aborted == ["req-1"]


async def test_each_choice_that_matches_a_stop_string_is_finished_in_the_engine(served):
    engine, stub = served
    replies = await collect(stub, chat("Hi", max_tokens=200, stop=["France"], n=2))
    for index in (0, 1):
        mine = [r for r in replies if r.index == index]
        assert "".join(r.text for r in mine) == "北京是中国的首都。 The capital of "
        assert mine[-1].finish_reason == llm_pb2.FINISH_REASON_STOP
    # Each choice's KV blocks are released as soon as its stop string matched.
    assert engine.finished == [("req-1", 0), ("req-1", 1)]


async def test_max_tokens_gives_length(served):
    _, stub = served
    replies = await collect(stub, chat("Hi", max_tokens=3))
    assert replies[-1].finish_reason == llm_pb2.FINISH_REASON_LENGTH
    assert replies[-1].usage.completion_tokens == 3


async def test_n_choices_each_finish(served):
    _, stub = served
    replies = await collect(stub, chat("Hi", max_tokens=200, n=2))
    for index in (0, 1):
        mine = [r for r in replies if r.index == index]
        assert "".join(r.text for r in mine) == ANSWER
        assert mine[-1].finish_reason == llm_pb2.FINISH_REASON_STOP


async def test_cancel_aborts_engine_request(served):
    engine, stub = served
    engine.delay = 0.05
    call = stub.Generate(chat("Hi", max_tokens=200))
    async for _ in call:
        break
    call.cancel()
    await eventually(lambda: engine.aborted, 2, "the engine request was not aborted")
    assert engine.aborted == ["req-1"] and not engine.active


@pytest.mark.parametrize("request_, code, words", [
    (chat("Hi", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (llm_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "messages, prompt"),
    (llm_pb2.GenerateRequest(prompt_token_ids=llm_pb2.TokenIds(ids=[10**6])),
     grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    (llm_pb2.GenerateRequest(messages=llm_pb2.Messages(messages=[llm_pb2.ChatMessage(
        role="user", content=[llm_pb2.ContentPart(image=common_pb2.MediaRef(url="data:x"))])])),
     grpc.StatusCode.INVALID_ARGUMENT, "no encoder"),
    (llm_pb2.GenerateRequest(messages=llm_pb2.Messages(messages=[llm_pb2.ChatMessage(
        role="function", content=[llm_pb2.ContentPart(text="x")])])),
     grpc.StatusCode.INVALID_ARGUMENT, "role"),
])
async def test_bad_requests_get_clear_status(served, request_, code, words):
    engine, stub = served
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub, request_)
    assert info.value.code() == code
    assert words in info.value.details()
    assert not engine.active


async def test_overloaded_is_resource_exhausted(served):
    engine, stub = served
    engine.refuse = True
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub, chat("Hi"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in info.value.details()


async def test_raw_prompt_and_token_ids(served, smollm2_tokenizer):
    engine, stub = served
    await collect(stub, llm_pb2.GenerateRequest(prompt="Once upon a time",
                                                sampling=llm_pb2.SamplingParams(max_tokens=2)))
    assert engine.requests[-1].prompt_token_ids == smollm2_tokenizer.encode("Once upon a time")
    await collect(stub, llm_pb2.GenerateRequest(prompt_token_ids=llm_pb2.TokenIds(ids=[1, 2, 3]),
                                                sampling=llm_pb2.SamplingParams(max_tokens=2)))
    assert engine.requests[-1].prompt_token_ids == [1, 2, 3]


async def test_model_info_reports_engine_stats(served):
    _, stub = served
    info = await stub.GetModelInfo(llm_pb2.ModelInfoRequest())
    assert info.model_id == "m" and info.stats.kv_blocks_total == 10


async def test_a_tool_call_in_the_output_streams_as_deltas(served, smollm2_tokenizer):
    engine, stub = served
    call = '{"name": "get_weather", "arguments": {"city": "北京"}}'
    engine.answer_ids = smollm2_tokenizer.encode(f"Let me check.\n<tool_call>\n{call}\n"
                                                 "</tool_call>", add_special_tokens=False)
    request = chat("Weather in Beijing?", max_tokens=200, temperature=0.0)
    request.tools.append(llm_pb2.Tool(name="get_weather", parameters='{"type": "object"}'))
    replies = await collect(stub, request)
    assert "".join(r.text for r in replies) == "Let me check.\n"
    deltas = [d for r in replies for d in r.tool_calls]
    assert deltas[0].id.startswith("call_") and deltas[0].name == "get_weather"
    assert len(deltas) > 2  # the arguments came in fragments, as the tokens did
    assert "".join(d.arguments for d in deltas) == '{"city": "北京"}'
    assert replies[-1].finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS
    prompt = smollm2_tokenizer.decode(engine.requests[0].prompt_token_ids)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in prompt
    assert engine.requests[0].sampling.structured is None  # auto: the model may answer in text
