"""Tool calling with the real SmolLM2 through the official client (and straight over gRPC):
`required` and a named function give calls whose arguments validate against the function's
schema, streamed deltas concatenate to the non-streamed answer, and bad requests are 400s that
name their field and leave the engine idle."""

from __future__ import annotations

import json

import grpc
import httpx
import jsonschema
import openai
import pytest
from e2e_stack import MODEL
from polling import wait_until

from protos import llm_pb2, llm_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}
TIME_PARAMS = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
               "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMS,
                                      "description": "The weather forecast for a city"}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMS,
                                      "description": "The time now in a time zone"}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
QUESTION = [{"role": "user", "content": "What is the weather in Rome for the next 3 days?"}]


def ask(client, **kw):
    kw.setdefault("max_tokens", 48)
    return client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, **kw)


def assert_valid_calls(message) -> list[tuple[str, str]]:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return [(call.function.name, call.function.arguments) for call in message.tool_calls]


def assert_idle(stack, idle_blocks: int) -> None:
    def idle() -> bool:
        stats = stack.engine_stats()
        return (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, idle_blocks)

    wait_until(idle, 10, "the engine did not go back to idle")


@pytest.fixture
def idle_blocks(mmserve_stack) -> int:
    assert_idle(mmserve_stack, mmserve_stack.engine_stats().kv_blocks_used)
    return mmserve_stack.engine_stats().kv_blocks_used


def test_required_calls_validate_and_stream_the_same(openai_client, mmserve_stack, idle_blocks):
    whole = ask(openai_client, tool_choice="required", temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = assert_valid_calls(choice.message)

    stream = ask(openai_client, tool_choice="required", temperature=0, stream=True)
    streamed: dict[int, list[str]] = {}
    finish = None
    for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = streamed.setdefault(delta.index, ["", ""])
            if delta.id:  # the first delta of a call: its id and name, then fragments
                assert delta.function.name and not entry[0]
            entry[0] += delta.function.name or ""
            entry[1] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert [tuple(streamed[i]) for i in sorted(streamed)] == calls
    assert finish == "tool_calls"
    assert_idle(mmserve_stack, idle_blocks)


def test_named_function_is_the_one_called(openai_client, mmserve_stack, idle_blocks):
    reply = ask(openai_client, tool_choice={"type": "function", "function": {"name": "get_time"}},
                parallel_tool_calls=False, temperature=1.0, seed=11, n=2)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        assert [name for name, _ in assert_valid_calls(choice.message)] == ["get_time"]
    assert_idle(mmserve_stack, idle_blocks)


def test_a_conversation_with_a_tool_result_gets_an_answer(openai_client, mmserve_stack,
                                                          idle_blocks):
    reply = openai_client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                                  tools=TOOLS, messages=[
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "sunny, 24 C"}'},
    ])
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in (
        "stop", "length", "tool_calls")
    assert reply.usage.prompt_tokens > 200  # the tools and the result are in the prompt
    assert_idle(mmserve_stack, idle_blocks)


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}},
     "tool_choice.function.name"),
    ({"logit_bias": {str(i): 1 for i in range(1000)}}, "logit_bias"),
    ({"stream": "yes"}, "stream"),
    ({"max_tokens": "8"}, "max_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
])
def test_bad_fields_are_400s_naming_them(mmserve_stack, idle_blocks, body, param):
    response = httpx.post(mmserve_stack.base + "/v1/chat/completions", timeout=60,
                          json={"model": MODEL, "messages": QUESTION, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param), error
    assert_idle(mmserve_stack, idle_blocks)


def test_the_official_client_gets_a_bad_request_error(openai_client):
    with pytest.raises(openai.BadRequestError) as info:
        ask(openai_client, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "'nope' is not one of the tools" in info.value.body["message"]


def test_grpc_clients_get_tool_calls(mmserve_stack, idle_blocks):
    request = llm_pb2.GenerateRequest(
        model=MODEL, messages=llm_pb2.Messages(messages=[llm_pb2.ChatMessage(
            role="user", content=[llm_pb2.ContentPart(text=QUESTION[0]["content"])])]),
        sampling=llm_pb2.SamplingParams(max_tokens=48, temperature=0),
        tools=[llm_pb2.Tool(name="get_weather", parameters=json.dumps(WEATHER_PARAMS))],
        tool_choice=llm_pb2.ToolChoice(function="get_weather"))
    with grpc.insecure_channel(f"127.0.0.1:{mmserve_stack.llm_port}") as channel:
        responses = list(llm_pb2_grpc.LLMStub(channel).Generate(request, timeout=120))
    deltas = [d for r in responses for d in r.tool_calls]
    assert deltas[0].id and deltas[0].name == "get_weather"
    arguments = "".join(d.arguments for d in deltas)
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMS)
    assert responses[-1].finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS
    assert "".join(r.text for r in responses) == ""
    assert_idle(mmserve_stack, idle_blocks)


def test_response_format_json_schema_streams_valid_json(openai_client, mmserve_stack,
                                                        idle_blocks):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    stream = openai_client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=40, temperature=1.0, seed=5, stream=True,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "forecast", "schema": schema, "strict": True}})
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    jsonschema.validate(json.loads(text), schema)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert_idle(mmserve_stack, idle_blocks)
