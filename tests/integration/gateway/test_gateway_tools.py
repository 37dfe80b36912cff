"""Tools, structured outputs and logit_bias through the gateway: what reaches the LLM service,
the OpenAI shapes that come back (streamed and not), and the 400s that name their field."""

from __future__ import annotations

import json

import openai
import pytest
from gateway_fake_llm import FRAGMENTS, MODEL_ID, TOOL_CALL_ARGUMENTS, TOOL_CALL_ID

from protos import llm_pb2

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture
async def openai_client(gateway_url, auth_headers):
    client = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1",
                                api_key=auth_headers["Authorization"].split()[1], max_retries=0)
    yield client
    await client.close()


async def test_tool_call_comes_back_as_tool_calls(openai_client, fake_llm) -> None:
    reply = await openai_client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call, = choice.message.tool_calls
    assert (call.id, call.type, call.function.name, call.function.arguments) == (
        TOOL_CALL_ID, "function", "get_weather", TOOL_CALL_ARGUMENTS)
    sent = fake_llm.requests[0]
    assert [t.name for t in sent.tools] == ["get_weather"]
    assert json.loads(sent.tools[0].parameters) == WEATHER["function"]["parameters"]
    assert sent.tool_choice.function == "get_weather" and sent.parallel_tool_calls is False


async def test_streamed_tool_call_deltas_concatenate_to_the_call(openai_client) -> None:
    stream = await openai_client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, tools=[WEATHER], tool_choice="required", stream=True)
    deltas = [(chunk.choices[0].delta, chunk.choices[0].finish_reason) async for chunk in stream]
    calls = [d.tool_calls[0] for d, _ in deltas if d.tool_calls]
    assert (calls[0].index, calls[0].id, calls[0].type, calls[0].function.name) == (
        0, TOOL_CALL_ID, "function", "get_weather")
    assert [c.function.arguments for c in calls] == ["", *FRAGMENTS]
    assert all(c.id is None and c.function.name is None for c in calls[1:])
    assert deltas[-1][1] == "tool_calls"


async def test_a_conversation_with_tool_results_reaches_the_service(client, fake_llm) -> None:
    response = await client.post("/v1/chat/completions", json={"messages": [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_9", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "21 C"},
    ], "tools": [WEATHER]})
    assert response.status_code == 200
    assistant, tool = fake_llm.requests[0].messages.messages[1:]
    assert [(c.id, c.name, c.arguments) for c in assistant.tool_calls] == [
        ("call_9", "get_weather", '{"city": "Paris"}')]
    assert (tool.role, tool.tool_call_id, tool.content[0].text) == ("tool", "call_9", "21 C")


@pytest.mark.parametrize(("fields", "kind", "value"), [
    ({"response_format": {"type": "json_object"}}, "json_object", True),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "city", "strict": True, "schema": {"type": "object"}}}},
     "json_schema", '{"type":"object"}'),
    ({"guided_json": {"type": "array"}}, "json_schema", '{"type":"array"}'),
    ({"guided_regex": "[0-9]+"}, "regex", "[0-9]+"),
    ({"guided_grammar": 'start: "yes" | "no"'}, "grammar", 'start: "yes" | "no"'),
    ({"structured_outputs": {"regex": "a+"}}, "regex", "a+"),
    ({"structured_outputs": {"json_object": True}}, "json_object", True),
])
async def test_constraints_map_to_structured_output(client, fake_llm, fields, kind, value) -> None:
    for path, body in (("/v1/chat/completions", {"messages": MESSAGES}),
                       ("/v1/completions", {"prompt": "x"})):
        response = await client.post(path, json={**body, **fields})
        assert response.status_code == 200, response.text
        structured = fake_llm.requests[-1].sampling.structured
        assert structured.WhichOneof("kind") == kind and getattr(structured, kind) == value


async def test_choice_and_logit_bias_map(client, fake_llm) -> None:
    response = await client.post("/v1/chat/completions", json={
        "messages": MESSAGES, "guided_choice": ["yes", "no"], "logit_bias": {"17": -100, "5": 3},
        "response_format": {"type": "text"}})
    assert response.status_code == 200
    sampling = fake_llm.requests[0].sampling
    assert list(sampling.structured.choice.choices) == ["yes", "no"]
    assert dict(sampling.logit_bias) == {17: -100.0, 5: 3.0}
    assert not llm_pb2.SamplingParams().HasField("structured")


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "'nope' is not one of the tools"),
    ({"tool_choice": "required"}, "tool_choice", "at least one function"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "the limit is 300"),
    ({"logit_bias": {"x": 1}}, "logit_bias.x.[key]", "pattern"),
    ({"logit_bias": {"1": 101}}, "logit_bias.1", "less than or equal to 100"),
    ({"stream": "yes"}, "stream", "valid boolean"),
    ({"max_tokens": 2.5}, "max_tokens", "valid integer"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
    ({"functions": [{"name": "f"}]}, "functions", "not supported by this server"),
    ({"audio": {"voice": "alloy"}}, "audio", "not supported by this server"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex",
     "one output constraint"),
    ({"guided_json": "{not json"}, "guided_json", "not a JSON document"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "f",
                                                                      "arguments": "{"}}]}]},
     "messages.0.tool_calls.0.function.arguments", "not JSON"),
])
async def test_bad_fields_are_400s_that_name_them(client, fake_llm, fields, param, words) -> None:
    response = await client.post("/v1/chat/completions", json={"messages": MESSAGES, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["message"].startswith(param.split(".[")[0])
    assert fake_llm.requests == []


async def test_informational_fields_are_accepted(client, fake_llm) -> None:
    response = await client.post("/v1/chat/completions", json={
        "messages": MESSAGES, "user": "u-1", "metadata": {"team": "a"}, "store": False})
    assert response.status_code == 200
    assert len(fake_llm.requests) == 1


async def test_completions_refuse_what_they_do_not_implement(client) -> None:
    for field, value in (("echo", True), ("best_of", 2), ("suffix", "x"), ("tools", [WEATHER])):
        response = await client.post("/v1/completions", json={"prompt": "x", field: value})
        assert response.status_code == 400 and response.json()["error"]["param"] == field
