"""GenerateMany over real gRPC: the LLM servicer with a scripted engine, read raw and through
the gateway's client (gateway/llm_streams.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from test_llm_server import ANSWER, chat, scripted_server

from gateway.llm_streams import Streams
from protos import llm_pb2, llm_pb2_grpc


@pytest.fixture
async def served(smollm2_tokenizer):
    async with scripted_server(smollm2_tokenizer) as (engine, server, channel):
        stub = llm_pb2_grpc.LLMStub(channel)
        streams = Streams(lambda commands: stub.GenerateMany(commands), 1)
        yield engine, stub, streams, server
        await streams.close()


def long_request(request_id: str) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(request_id=request_id, prompt="x",
                                   sampling=llm_pb2.SamplingParams(max_tokens=500))


async def aborted(engine, request_id: str) -> bool:
    """Whether the engine aborts `request_id` within 2 s."""
    for _ in range(100):
        if request_id in engine.aborted:
            return True
        await asyncio.sleep(0.02)
    return False


def start(stream_id: int, request: llm_pb2.GenerateRequest, **fields) -> llm_pb2.GenerateCommand:
    return llm_pb2.GenerateCommand(stream_id=stream_id, start=llm_pb2.StartGeneration(
        request=request, **fields))


async def text_of(call) -> str:
    return "".join([response.text async for response in call])


class Clock:
    """One engine step every `period` seconds; every sequence waiting on it wakes together."""

    def __init__(self, period: float) -> None:
        self.period, self.steps = period, 0
        self._tick = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            tick, self._tick = self._tick, asyncio.get_running_loop().create_future()
            self.steps += 1
            tick.set_result(None)

    async def wait(self) -> None:
        await asyncio.shield(self._tick)

    def stop(self) -> None:
        self._task.cancel()


async def test_each_generation_streams_what_generate_would_and_steps_share_messages(served):
    engine, stub, _, _ = served
    engine.delay = 0.01
    expected = await text_of(stub.Generate(chat("Hi", max_tokens=12)))
    assert expected == ANSWER[:len(expected)] and expected
    clock = Clock(0.01)
    engine.step = clock.wait
    n = 8
    commands = [start(i, chat("Hi", max_tokens=12), request_id=f"r{i}") for i in range(n)]
    call = stub.GenerateMany(iter(commands))
    texts, ends, messages, responses = [""] * n, {}, 0, 0
    try:
        async for batch in call:
            messages += 1
            for event in batch.events:
                if event.WhichOneof("event") == "response":
                    responses += 1
                    texts[event.stream_id] += event.response.text
                else:
                    ends[event.stream_id] = event.end.code
    finally:
        clock.stop()
    assert texts == [expected] * n
    assert ends == dict.fromkeys(range(n), 0)
    # The 8 sequences step together: one message carries a step's responses for all of them
    # (a sequence that joined a step late or ended adds a message, not one per response).
    assert responses == n * len(engine.answer_ids[:12])
    assert messages < responses / 4, (messages, responses, clock.steps)
    assert sorted(r.request_id for r in engine.requests[1:]) == [f"r{i}" for i in range(n)]


async def test_the_gateway_client_reads_generations_side_by_side(served):
    engine, stub, streams, _ = served
    engine.delay = 0.005
    calls = [streams.start(chat("Hi", max_tokens=9), 60.0) for _ in range(5)]
    texts = await asyncio.gather(*(text_of(call) for call in calls))
    assert len(set(texts)) == 1 and texts[0] == ANSWER[:len(texts[0])] and texts[0]


async def test_a_cancelled_generation_is_aborted_and_the_others_go_on(served):
    engine, _, streams, _ = served
    engine.delay = 0.02
    keep = streams.start(chat("Hi", max_tokens=10), 60.0)
    drop = streams.start(long_request("drop"), 60.0)
    first = await drop.read()
    assert first.text or first.token_ids
    assert drop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await drop.read()
    assert await text_of(keep)
    assert await aborted(engine, "drop") and "drop" not in engine.active


async def test_a_generation_past_its_deadline_ends_deadline_exceeded_and_is_aborted(served):
    engine, _, streams, _ = served
    engine.delay = 0.05
    call = streams.start(long_request("slow"), 0.3)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await text_of(call)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "slow" in engine.aborted


async def test_errors_end_only_their_own_stream_with_the_status_generate_gives(served):
    engine, stub, streams, _ = served
    bad = streams.start(chat("Hi", max_tokens=5, top_p=7.0), 60.0)
    good = streams.start(chat("Hi", max_tokens=5), 60.0)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await text_of(bad)
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await text_of(stub.Generate(chat("Hi", max_tokens=5, top_p=7.0)))
    assert info.value.code() is unary.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == unary.value.details() and "top_p" in info.value.details()
    assert await text_of(good)
    engine.refuse = True
    busy = streams.start(chat("Hi", max_tokens=5), 60.0)
    with pytest.raises(grpc.aio.AioRpcError) as overloaded:
        await text_of(busy)
    assert overloaded.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(overloaded.value.trailing_metadata())["retry-after"]) >= 1


async def test_a_reused_stream_id_is_refused(served):
    engine, stub, _, _ = served
    engine.delay = 0.02
    request = chat("Hi", max_tokens=5)
    call = stub.GenerateMany(iter([start(7, request), start(7, request)]))
    ends = [event.end for batch in [b async for b in call] for event in batch.events
            if event.WhichOneof("event") == "end"]
    assert [end.code for end in ends] == [grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert "already open" in ends[0].message


async def test_draining_refuses_new_generations_and_lets_running_ones_finish(served):
    engine, _, streams, server = served
    engine.delay = 0.02
    running = streams.start(chat("Hi", max_tokens=10), 60.0)
    assert (await running.read()).token_ids
    server.drain.start()
    refused = streams.start(chat("Hi", max_tokens=10), 60.0)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await text_of(refused)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in info.value.details()
    assert await text_of(running)
    assert server.drain.in_flight == 0


async def test_a_broken_call_fails_its_open_generations(served):
    engine, _, streams, server = served
    engine.delay = 0.05
    call = streams.start(long_request("cut"), 60.0)
    assert await call.read()
    await server.grpc.stop(0)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await text_of(call)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert await aborted(engine, "cut")
