"""Structured outputs from real SmolLM2 weights: every sampled output (temperature 1.0, three
seeds) parses and validates against its JSON Schema, in the engine and through gRPC."""

from __future__ import annotations

import asyncio
import json

import grpc
import jsonschema
import pytest
import pytest_asyncio

from llm_service.engine.async_engine import TorchEngine
from llm_service.engine.config import EngineConfig
from llm_service.engine.errors import InvalidRequest
from llm_service.engine.protocol import EngineRequest, FinishReason, SamplingParams, StructuredOutput
from llm_service.generator import Generator
from llm_service.prompt.families import load_family
from llm_service.server import LLMServicer, build_server
from polling import eventually
from protos import llm_pb2, llm_pb2_grpc

EOS = 2
MAX_TOKENS = 96
SEEDS = (0, 1, 2)
# One engine for the module: its tests run on the event loop that started it.
pytestmark = pytest.mark.asyncio(loop_scope="module")
STRICT = {"type": "object", "additionalProperties": False}
SCHEMAS = {
    "nested objects": {**STRICT, "required": ["user"], "properties": {"user": {
        **STRICT, "required": ["name", "age"], "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120}}}}},
    "array with min and max items": {**STRICT, "required": ["colors"], "properties": {
        "colors": {"type": "array", "items": {"type": "string", "maxLength": 8},
                   "minItems": 2, "maxItems": 3}}},
    "enums": {**STRICT, "required": ["mood", "level"], "properties": {
        "mood": {"enum": ["happy", "sad", "calm"]}, "level": {"enum": [1, 2, 3]}}},
    "bounded numbers": {**STRICT, "required": ["celsius", "count"], "properties": {
        "celsius": {"type": "number", "minimum": -10, "maximum": 40},
        "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 10}}},
    "optional fields": {**STRICT, "required": ["title"], "properties": {
        "title": {"type": "string", "maxLength": 16},
        "subtitle": {"type": "string", "maxLength": 16},
        "pages": {"type": "integer", "minimum": 1, "maximum": 999}}},
    "string patterns": {**STRICT, "required": ["date", "code"], "properties": {
        "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}}},
    "array of objects": {**STRICT, "required": ["items"], "properties": {"items": {
        "type": "array", "minItems": 1, "maxItems": 2, "items": {
            **STRICT, "required": ["sku", "qty"], "properties": {
                "sku": {"type": "string", "pattern": "^[a-z]{2}[0-9]{2}$"},
                "qty": {"type": "integer", "minimum": 1, "maximum": 9}}}}}},
    "anyOf, const and booleans": {**STRICT, "required": ["ok", "value", "kind"], "properties": {
        "ok": {"type": "boolean"},
        "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]},
        "kind": {"const": "report"}}},
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(smollm2_dir):
    engine = TorchEngine(EngineConfig(model_dir=smollm2_dir, placement="thread", warm_up=False,
                                      max_num_seqs=32, max_num_batched_tokens=1024))
    await engine.start()
    yield engine
    await engine.shutdown()


def prompt(smollm2_tokenizer, name: str) -> list[int]:
    messages = [{"role": "user", "content": f"Reply with a JSON example of: {name}."}]
    ids = smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


async def run(engine, request: EngineRequest) -> dict[int, tuple[list[int], FinishReason]]:
    tokens: dict[int, list[int]] = {}
    reasons = {}
    async for out in engine.generate(request):
        tokens.setdefault(out.index, []).extend(out.new_token_ids)
        if request.sampling.logprobs is not None:
            assert len(out.logprobs) == len(out.new_token_ids)
        if out.finish_reason is not None:
            assert out.error is None, out.error
            reasons[out.index] = out.finish_reason
    return {i: (tokens.get(i, []), reasons[i]) for i in reasons}


async def test_every_sampled_output_validates_against_its_schema(engine, smollm2_tokenizer):
    requests = []
    for name, schema in SCHEMAS.items():
        spec = StructuredOutput("json_schema", json.dumps(schema))
        for seed in SEEDS:
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
                                    structured=spec)
            requests.append((name, schema, EngineRequest(
                f"{name}-{seed}", prompt(smollm2_tokenizer, name), params, (), (EOS,))))
    results = await asyncio.gather(*(run(engine, r) for _, _, r in requests))
    for (name, schema, _), result in zip(requests, results):
        tokens, reason = result[0]
        text = smollm2_tokenizer.decode(tokens, skip_special_tokens=True)
        assert reason == FinishReason.STOP, (name, text)
        jsonschema.validate(json.loads(text), schema)
    assert engine.stats().kv_blocks_used == 0


async def test_regex_choice_grammar_n_and_logprobs(engine, smollm2_tokenizer):
    ids = prompt(smollm2_tokenizer, "a date")
    cases = [
        (StructuredOutput("regex", "[0-9]{4}-[0-9]{2}-[0-9]{2}"),
         lambda t: len(t) == 10 and t[4] == "-" and t.replace("-", "").isdigit()),
        (StructuredOutput("choice", choices=("red", "green", "blue")),
         lambda t: t in ("red", "green", "blue")),
        (StructuredOutput("grammar", 'start: "ok " NUMBER\nNUMBER: /[1-9][0-9]?/'),
         lambda t: t.startswith("ok ") and t[3:].isdigit()),
        (StructuredOutput("grammar", 'root ::= "yes" | "no"'), lambda t: t in ("yes", "no")),
    ]
    # (json_object is left to the unit tests: a 135M model asked for "any object" nests keys
    # until max_tokens runs out.)
    requests = [EngineRequest(f"kinds-{k}", ids, SamplingParams(
        max_tokens=MAX_TOKENS, temperature=1.0, seed=k, n=2, logprobs=1, structured=spec),
        (), (EOS,)) for k, (spec, _) in enumerate(cases)]
    results = await asyncio.gather(*(run(engine, r) for r in requests))
    for (spec, valid), result in zip(cases, results):
        assert sorted(result) == [0, 1]
        for tokens, reason in result.values():
            text = smollm2_tokenizer.decode(tokens, skip_special_tokens=True)
            assert reason == FinishReason.STOP and valid(text), (spec, text)


async def test_unenforceable_schema_is_refused_and_holds_nothing(engine, smollm2_tokenizer):
    spec = StructuredOutput("json_schema", json.dumps({"type": "array", "uniqueItems": True}))
    request = EngineRequest("bad", prompt(smollm2_tokenizer, "x"), SamplingParams(structured=spec))
    with pytest.raises(InvalidRequest, match="uniqueItems"):
        await run(engine, request)
    stats = engine.stats()
    assert (stats.kv_blocks_used, stats.running, stats.waiting) == (0, 0, 0)


@pytest_asyncio.fixture(loop_scope="module")
async def served(engine, smollm2_tokenizer):
    family = load_family("smollm2", smollm2_tokenizer)
    servicer = LLMServicer(Generator(engine, smollm2_tokenizer, family, None), engine,
                           dict(model_id="m", family="smollm2"))
    server = build_server(servicer)
    port = await server.start("127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield llm_pb2_grpc.LLMStub(channel)
    await channel.close()
    await server.stop(0)


def chat(name: str, schema: dict | str, seed: int, rid: str) -> llm_pb2.GenerateRequest:
    structured = llm_pb2.StructuredOutput(
        json_schema=schema if isinstance(schema, str) else json.dumps(schema))
    return llm_pb2.GenerateRequest(
        request_id=rid,
        messages=llm_pb2.Messages(messages=[llm_pb2.ChatMessage(
            role="user", content=[llm_pb2.ContentPart(text=f"A JSON example of: {name}.")])]),
        sampling=llm_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
                                        structured=structured))


async def test_structured_outputs_through_grpc(served, engine):
    names = list(SCHEMAS)[:4]

    async def text_of(name: str, seed: int) -> tuple[str, int]:
        replies = [r async for r in served.Generate(chat(name, SCHEMAS[name], seed,
                                                         f"grpc-{name}-{seed}"))]
        return "".join(r.text for r in replies), replies[-1].finish_reason

    results = await asyncio.gather(*(text_of(n, s) for n in names for s in SEEDS))
    for (name, _), (text, reason) in zip([(n, s) for n in names for s in SEEDS], results):
        assert reason == llm_pb2.FINISH_REASON_STOP, text
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [r async for r in served.Generate(chat("x", '{"type": "string", "not": {}}', 0, "b"))]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'Unimplemented keys: ["not"]' in caught.value.details()
    bias = llm_pb2.GenerateRequest(request_id="big-bias", prompt="hi", sampling=llm_pb2.SamplingParams(
        logit_bias={100_000: 1.0}))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [r async for r in served.Generate(bias)]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "logit_bias" in caught.value.details()
    await eventually(lambda: engine.stats().kv_blocks_used == 0)
