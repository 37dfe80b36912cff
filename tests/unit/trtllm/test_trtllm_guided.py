"""Structured outputs and logit_bias on the TensorRT-LLM path (fake bindings): the executor's
own guided decoding, configured from the tokenizer and mapped from the same spec."""

from __future__ import annotations

import json

import pytest

from llm_service.engine.errors import InvalidRequest
from llm_service.engine.protocol import EngineRequest, SamplingParams, StructuredOutput

pytestmark = pytest.mark.timeout(60)

PROMPT = [11, 12, 13, 14, 15]
SCHEMA = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})


async def collect(engine, request):
    return [out async for out in engine.generate(request)]


def structured(rid: str, spec: StructuredOutput, **sampling) -> EngineRequest:
    return EngineRequest(rid, PROMPT, SamplingParams(max_tokens=2, structured=spec, **sampling))


async def test_the_executor_gets_the_tokenizer_and_each_request_its_guide(start, tle, smollm2_dir):
    engine, fake = await start(tokenizer_dir=str(smollm2_dir))
    config = fake.config.guided_decoding_config
    assert config.backend == tle.GuidedDecodingConfig.GuidedDecodingBackend.XGRAMMAR
    assert len(config.encoded_vocab) == 49152 and config.stop_token_ids == [2]
    assert json.loads(config.tokenizer_str)["model"]["type"] == "BPE"
    guide = tle.GuidedDecodingParams.GuideType
    cases = [
        (StructuredOutput("json_schema", SCHEMA), guide.JSON_SCHEMA, SCHEMA),
        (StructuredOutput("json_object"), guide.JSON, None),
        (StructuredOutput("regex", "[0-9]+"), guide.REGEX, "[0-9]+"),
        (StructuredOutput("choice", choices=("yes", 'say "no"')), guide.EBNF_GRAMMAR,
         'root ::= "yes" | "say \\"no\\""'),
        (StructuredOutput("grammar", 'root ::= "a" | "b"'), guide.EBNF_GRAMMAR,
         'root ::= "a" | "b"'),
    ]
    for k, (spec, guide_type, text) in enumerate(cases):
        await collect(engine, structured(f"r{k}", spec))
        sent = list(fake.requests.values())[-1].guided_decoding_params
        assert (sent.guide_type, sent.guide) == (guide_type, text)


@pytest.mark.parametrize("spec, words", [
    (StructuredOutput("json_schema", '{"type": "array", "uniqueItems": true}'),
     'Unimplemented keys: \\["uniqueItems"\\]'),
    (StructuredOutput("regex", "[a-z"), "unclosed character class"),
    (StructuredOutput("grammar", 'start: "a"'), "EBNF \\(GBNF\\) grammars only"),
])
async def test_what_cannot_be_enforced_is_a_400_before_the_executor(start, smollm2_dir, spec,
                                                                    words):
    engine, fake = await start(tokenizer_dir=str(smollm2_dir))
    with pytest.raises(InvalidRequest, match=words):
        await collect(engine, structured("bad", spec))
    assert not fake.requests


async def test_logit_bias_is_the_requests_embedding_bias(start):
    engine, fake = await start()
    await collect(engine, EngineRequest("b", PROMPT, SamplingParams(
        max_tokens=2, logit_bias=((3, 5.0), (999, -100.0)))))
    bias = list(fake.requests.values())[-1].embedding_bias
    assert tuple(bias.shape) == (1000,) and float(bias.abs().sum()) == 105.0
    assert (float(bias[3]), float(bias[999])) == (5.0, -100.0)
    with pytest.raises(InvalidRequest, match=r"logit_bias: token ids \[1000\] are outside"):
        await collect(engine, EngineRequest("c", PROMPT, SamplingParams(
            logit_bias=((1000, 1.0),))))


async def test_without_a_tokenizer_structured_requests_are_refused_and_others_served(start):
    engine, fake = await start()  # the engine directory holds no tokenizer
    assert fake.config.guided_decoding_config is None
    with pytest.raises(InvalidRequest, match="structured output is off .*did not load"):
        await collect(engine, structured("s", StructuredOutput("json_object")))
    outputs = await collect(engine, EngineRequest("a", PROMPT, SamplingParams(max_tokens=2)))
    assert [t for out in outputs for t in out.new_token_ids] == [11, 12]


async def test_guided_decoding_can_be_switched_off(start, smollm2_dir):
    engine, fake = await start(tokenizer_dir=str(smollm2_dir), guided_decoding=False)
    assert fake.config.guided_decoding_config is None
    with pytest.raises(InvalidRequest, match="guided_decoding is false"):
        await collect(engine, structured("s", StructuredOutput("regex", "a")))


async def test_an_older_binding_refuses_structured_output_but_takes_logit_bias(
        fake_flavour, start, smollm2_dir):
    fake_flavour("0.13.0")
    engine, fake = await start(tokenizer_dir=str(smollm2_dir))
    with pytest.raises(InvalidRequest, match=r"structured output \(guided decoding\) is not "
                                             r"available with TensorRT-LLM 0\.13\.0"):
        await collect(engine, structured("s", StructuredOutput("regex", "a")))
    await collect(engine, EngineRequest("b", PROMPT, SamplingParams(
        max_tokens=2, logit_bias=((3, 5.0),))))
    assert float(list(fake.requests.values())[-1].embedding_bias[3]) == 5.0
