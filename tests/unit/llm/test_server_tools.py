"""The servicer's edge for tools: GenerateRequest.tools and tool_choice in, the tool-call
constraint on the sampling params, assistant calls and tool results as messages, and
tool-call deltas and FINISH_REASON_TOOL_CALLS out."""

from __future__ import annotations

import json

import pytest

from llm_service.engine.protocol import FinishReason
from llm_service.errors import InvalidRequest
from llm_service.generator import Chunk
from llm_service.server import (
    chunk_to_pb,
    messages_from_pb,
    sampling_from_pb,
    tools_from_pb,
    with_tool_constraint,
)
from llm_service.tool_calls import ChoiceMode, ToolCallDelta
from protos import llm_pb2

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def chat(**fields) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(messages=llm_pb2.Messages(messages=[llm_pb2.ChatMessage(
        role="user", content=[llm_pb2.ContentPart(text="hi")])]), **fields)


def weather() -> llm_pb2.Tool:
    return llm_pb2.Tool(name="get_weather", description="d", parameters=json.dumps(PARAMS))


def test_tools_and_each_choice():
    assert tools_from_pb(chat()) is None
    auto = tools_from_pb(chat(tools=[weather()]))
    assert auto.mode is ChoiceMode.AUTO and auto.parallel
    assert auto.tools[0].parameters == PARAMS and auto.tools[0].description == "d"
    named = tools_from_pb(chat(tools=[weather()], parallel_tool_calls=False,
                               tool_choice=llm_pb2.ToolChoice(function="get_weather")))
    assert (named.mode, named.function, named.parallel) == (ChoiceMode.FUNCTION, "get_weather",
                                                            False)
    assert tools_from_pb(chat(tools=[weather()], tool_choice=llm_pb2.ToolChoice(
        mode=llm_pb2.TOOL_CHOICE_NONE))) is None


@pytest.mark.parametrize(("request_pb", "words"), [
    (chat(tools=[weather()], tool_choice=llm_pb2.ToolChoice(function="nope")),
     "'nope' is not one of the tools"),
    (chat(tool_choice=llm_pb2.ToolChoice(mode=llm_pb2.TOOL_CHOICE_REQUIRED)), "at least one"),
    (chat(tools=[llm_pb2.Tool(name="f", parameters="{oops")]), "parameters is not JSON"),
    (llm_pb2.GenerateRequest(prompt="x", tools=[weather()]), "chat messages"),
])
def test_bad_tool_requests_are_invalid(request_pb, words):
    with pytest.raises(InvalidRequest, match=words):
        tools_from_pb(request_pb)


def test_required_puts_the_call_schema_on_the_sampling_params():
    tools = tools_from_pb(chat(tools=[weather()], tool_choice=llm_pb2.ToolChoice(
        mode=llm_pb2.TOOL_CHOICE_REQUIRED)))
    sampling = llm_pb2.SamplingParams(max_tokens=9)
    constrained = with_tool_constraint(sampling, tools, "parameters")
    assert not sampling.HasField("structured")  # the request itself is not changed
    schema = json.loads(constrained.structured.json_schema)
    assert schema["type"] == "array" and schema["items"]["required"] == ["name", "parameters"]
    params, _, _ = sampling_from_pb(constrained)
    assert params.structured is not None and params.max_tokens == 9
    assert with_tool_constraint(sampling, tools_from_pb(chat(tools=[weather()])),
                                "arguments") is sampling  # auto: free text
    with pytest.raises(InvalidRequest, match="already constrains"):
        with_tool_constraint(llm_pb2.SamplingParams(structured=llm_pb2.StructuredOutput(
            json_object=True)), tools, "arguments")


def test_assistant_calls_and_tool_results_become_messages():
    messages = messages_from_pb([
        llm_pb2.ChatMessage(role="assistant", tool_calls=[
            llm_pb2.ToolCall(id="c1", name="get_weather", arguments='{"city": "Oslo"}')]),
        llm_pb2.ChatMessage(role="tool", tool_call_id="c1", name="get_weather",
                            content=[llm_pb2.ContentPart(text="5 C")]),
    ])
    assert [(c.id, c.name, c.arguments) for c in messages[0].tool_calls] == [
        ("c1", "get_weather", '{"city": "Oslo"}')]
    assert (messages[1].role, messages[1].tool_call_id, messages[1].name, messages[1].text) == (
        "tool", "c1", "get_weather", "5 C")


def test_tool_call_deltas_and_their_finish_reason():
    deltas = (ToolCallDelta(0, "call_1", "get_weather", ""), ToolCallDelta(0, arguments="{}"))
    reply = chunk_to_pb(Chunk(0, "", [5], FinishReason.STOP, tool_calls=deltas,
                              made_tool_calls=True))
    assert reply.finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS
    assert [(d.index, d.id, d.name, d.arguments) for d in reply.tool_calls] == [
        (0, "call_1", "get_weather", ""), (0, "", "", "{}")]
    # Cut off by max_tokens, the choice ended at its length, calls or not.
    assert chunk_to_pb(Chunk(0, "", [5], FinishReason.LENGTH, made_tool_calls=True)
                       ).finish_reason == llm_pb2.FINISH_REASON_LENGTH
