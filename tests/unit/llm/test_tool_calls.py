"""The tool-call parser: model text in, plain text and OpenAI-style call deltas out, the same
however the text is split into pieces; and the schema that holds `required` to the tools."""

from __future__ import annotations

import json

import jsonschema
import pytest

from llm_service.errors import InvalidRequest
from llm_service.prompt.template import bare
from llm_service.prompt.tools import HermesFormat, InternLM2Format, Tool
from llm_service.tool_calls import ChoiceMode, ToolCallParser, ToolRequest

WEATHER = Tool("get_weather", "", {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city"], "additionalProperties": False})
ADD = Tool("add")
HERMES = HermesFormat("system")
INTERNLM2 = InternLM2Format("system", "\n", bare)


def parse(request: ToolRequest, fmt, text: str, step: int):
    """(plain text, [(id, name, arguments)], made_calls, first delta of each call)."""
    parser = ToolCallParser(request, fmt)
    pieces = [parser.feed(text[i:i + step]) for i in range(0, len(text), step)]
    pieces.append(parser.finish())
    calls: dict[int, list[str]] = {}
    firsts = {}
    for piece in pieces:
        for delta in piece.calls:
            firsts.setdefault(delta.index, delta)
            call = calls.setdefault(delta.index, ["", "", ""])
            call[0] += delta.id
            call[1] += delta.name
            call[2] += delta.arguments
    text_out = "".join(piece.text for piece in pieces)
    return text_out, [tuple(calls[i]) for i in sorted(calls)], parser.made_calls, firsts


TWO_CALLS = ('Checking. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}"}}'
             '\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": [1, {"b": 2}]}}\n'
             "</tool_call>")


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_hermes_calls_are_the_same_however_the_text_is_split(step):
    text, calls, made, firsts = parse(ToolRequest((WEATHER, ADD)), HERMES, TWO_CALLS, step)
    assert text == "Checking. \n" and made
    assert [(name, args) for _, name, args in calls] == [
        ("get_weather", '{"city": "Pa\\"ris}"}'), ("add", '{"a": [1, {"b": 2}]}')]
    # The first delta of each call carries its id and name, no arguments yet.
    assert all(d.id.startswith("call_") and d.name and d.arguments == "" for d in firsts.values())
    assert len({call_id for call_id, _, _ in calls}) == 2


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_internlm2_action_blocks(step):
    out = ('Sure.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": '
           '{"city": "Rome"}}<|action_end|>')
    text, calls, made, _ = parse(ToolRequest((WEATHER,)), INTERNLM2, out, step)
    assert (text, [c[1:] for c in calls], made) == ("Sure.", [("get_weather",
                                                             '{"city": "Rome"}')], True)


@pytest.mark.parametrize(("out", "expected_text"), [
    ("No call here, <tool_ is not a marker", "No call here, <tool_ is not a marker"),
    ('<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>'),
    ("<tool_call>\nnot json\n</tool_call> after", "<tool_call>\nnot json\n</tool_call> after"),
])
def test_text_that_is_not_a_call_stays_text(out, expected_text):
    for step in (1, 4, 1000):
        assert parse(ToolRequest((WEATHER,)), HERMES, out, step)[:3] == (expected_text, [], False)


def test_a_call_in_the_other_key_order_is_parsed_whole():
    out = '<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>'
    text, calls, made, _ = parse(ToolRequest((WEATHER,)), HERMES, out, 3)
    assert (text, calls[0][1:], made) == ("", ("get_weather", '{"city": "Oslo"}'), True)


def test_an_unclosed_call_at_the_end_still_counts():
    out = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    assert parse(ToolRequest((WEATHER,)), HERMES, out, 4)[1][0][1:] == (
        "get_weather", '{"city": "Oslo"}')


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_constrained_output_is_the_bare_wrapper(step):
    required = ToolRequest((WEATHER, ADD), ChoiceMode.REQUIRED)
    out = ('[{"name":"add","arguments":{"x":[1,2]}},\n {"name": "get_weather", "arguments": '
           '{"city": "Lima", "days": 3}}]')
    text, calls, made, _ = parse(required, HERMES, out, step)
    assert (text, made) == ("", True)
    assert [c[1:] for c in calls] == [("add", '{"x":[1,2]}'),
                                      ("get_weather", '{"city": "Lima", "days": 3}')]
    jsonschema.validate(json.loads(out), json.loads(required.schema()))


def test_required_schema_holds_arguments_to_the_function_schema():
    named = json.loads(ToolRequest((WEATHER, ADD), ChoiceMode.FUNCTION, "get_weather",
                                   parallel=True).schema())
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}, named)
    for bad in ({"name": "add", "arguments": {}},
                {"name": "get_weather", "arguments": {"city": "Oslo", "days": 9}},
                {"name": "get_weather", "arguments": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, named)
    single = json.loads(ToolRequest((WEATHER, ADD), ChoiceMode.REQUIRED, parallel=False).schema())
    jsonschema.validate({"name": "add", "arguments": {"any": 1}}, single)
    key = json.loads(ToolRequest((WEATHER,), ChoiceMode.REQUIRED, parallel=False)
                     .schema("parameters"))
    assert key["required"] == ["name", "parameters"]


def test_bad_tool_requests_are_refused():
    with pytest.raises(InvalidRequest, match="'nope' is not one of the tools"):
        ToolRequest((WEATHER,), ChoiceMode.FUNCTION, "nope")
    with pytest.raises(InvalidRequest, match="unique"):
        ToolRequest((WEATHER, WEATHER))
    with pytest.raises(InvalidRequest, match="at least one tool"):
        ToolRequest((), ChoiceMode.REQUIRED)


def test_without_parallel_calls_only_the_first_call_counts():
    text, calls, made, _ = parse(ToolRequest((WEATHER, ADD), parallel=False), HERMES, TWO_CALLS, 5)
    assert made and [c[1] for c in calls] == ["get_weather"]
    assert text.startswith("Checking. \n<tool_call>\n{\"name\": \"add\"")
