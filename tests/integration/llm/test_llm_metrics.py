"""The LLM service's Prometheus endpoint (vLLM names) and its Retry-After, over real gRPC
and HTTP on port 0, with the scripted engine of test_llm_server."""

from __future__ import annotations

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_llm_server import ScriptedEngine, chat

from gateway.errors import from_rpc_error
from llm_service.engine.protocol import EngineStats
from llm_service.generator import Generator
from llm_service.metrics import DrainRate
from llm_service.prompt.families import load_family
from llm_service.server import LLMServicer, build_server
from protos import llm_pb2_grpc


class QueuedEngine(ScriptedEngine):
    def stats(self) -> EngineStats:
        return EngineStats(kv_blocks_total=8, kv_blocks_used=2, running=1, waiting=20)


@pytest.fixture
async def served(smollm2_tokenizer):
    engine = QueuedEngine(smollm2_tokenizer)
    generator = Generator(engine, smollm2_tokenizer, load_family("smollm2", smollm2_tokenizer),
                          None)
    servicer = LLMServicer(generator, engine, dict(model_id="m", family="smollm2"))
    server = build_server(servicer)
    port = await server.start("127.0.0.1", 0)
    http = servicer.metrics.serve("127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield engine, servicer, llm_pb2_grpc.LLMStub(channel), f"http://127.0.0.1:{http.server_port}"
    await channel.close()
    http.shutdown()
    await server.stop(0)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_use_vllm_names_types_and_labels(served):
    engine, _, stub, url = served
    replies = [r async for r in stub.Generate(chat("Hi", max_tokens=5))]
    completion = sum(len(r.token_ids) for r in replies)
    prompt = replies[-1].usage.prompt_tokens
    async with httpx.AsyncClient() as client:
        text = (await client.get(url + "/metrics")).text
    s = _samples(text)
    m = (("model_name", "m"),)
    assert s[("vllm:num_requests_running", m)] == 1
    assert s[("vllm:num_requests_waiting", m)] == 20
    assert s[("vllm:kv_cache_usage_perc", m)] == 0.25
    assert s[("vllm:prompt_tokens_total", m)] == prompt > 0
    assert s[("vllm:generation_tokens_total", m)] == completion == 5
    assert s[("vllm:prefix_cache_queries_total", m)] == prompt
    assert s[("vllm:prefix_cache_hits_total", m)] == 3  # the scripted engine's cached tokens
    assert s[("vllm:request_success_total", (("finished_reason", "length"), *m))] == 1
    assert s[("vllm:time_to_first_token_seconds_count", m)] == 1
    assert s[("vllm:inter_token_latency_seconds_count", m)] == completion - 1
    assert s[("vllm:e2e_request_latency_seconds_count", m)] == 1
    assert s[("vllm:request_queue_time_seconds_count", m)] == 1
    # vLLM's buckets, so dashboards built for vLLM read the same quantiles.
    assert ("vllm:time_to_first_token_seconds_bucket", (("le", "2560.0"), *m)) in s
    assert ("vllm:e2e_request_latency_seconds_bucket", (("le", "7680.0"), *m)) in s


async def test_a_refused_request_is_told_when_the_queue_will_have_drained(served):
    engine, servicer, stub, _ = served
    now = [100.0]
    drain = DrainRate(window_s=30, clock=lambda: now[0])
    for _ in range(60):  # 2 requests finished per second over the last 30 s
        drain.finished()
    now[0] += 30
    servicer.metrics.drain = drain
    engine.refuse = True
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Generate(chat("Hi")).read()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # 20 waiting + this one, at 2 per second: 11 s, not a constant 1.
    assert dict(refused.value.trailing_metadata())["retry-after"] == "11"
    assert from_rpc_error(refused.value).headers["Retry-After"] == "11"


def test_drain_rate_without_history_and_its_bounds():
    now = [0.0]
    drain = DrainRate(window_s=30, clock=lambda: now[0])
    assert drain.retry_after_s(100) == 5  # nothing finished yet: a short, honest guess
    drain.finished()
    now[0] = 0.5
    assert drain.per_second() == 1.0  # never divided by less than a second
    assert drain.retry_after_s(0) == 1
    assert drain.retry_after_s(10_000) == 600  # capped
    now[0] = 100
    assert drain.per_second() == 0.0  # the finish left the window
