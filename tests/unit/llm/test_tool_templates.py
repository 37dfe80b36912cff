"""Tools, calls and tool results render exactly as each family's reference does.

SmolLM2 and Qwen-style ChatML: Qwen2.5-Instruct's chat template (below, verbatim but for its
default system prompt, which becomes the family's), rendered by transformers'
apply_chat_template. Without tools a SmolLM2 conversation is its own (GGUF) template's.
InternLM2: the agent format of InternLM2-Chat's chat_format document, as an exact string.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llm_service.prompt.families import (
    INTERNLM2_SYSTEM,
    SMOLLM2_SYSTEM,
    load_family,
)
from llm_service.prompt.messages import Message, TextPart, ToolCall
from llm_service.prompt.tools import Tool

QWEN25_TOOL_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'DEFAULT_SYSTEM' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nDEFAULT_SYSTEM<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

WEATHER = Tool("get_weather", "The weather in a city, now.", {
    "type": "object", "properties": {"city": {"type": "string"},
                                     "unit": {"type": "string", "enum": ["C", "F"]}},
    "required": ["city"]})
TIME = Tool("get_time", "", {"type": "object", "properties": {"zone": {"type": "string"}}})
TOOLS = (WEATHER, TIME)

CALLS = (ToolCall("call_1", "get_weather", '{"city": "Paris", "unit": "C"}'),
         ToolCall("call_2", "get_time", '{"zone": "Europe/Paris"}'))


def conversation(system: str | None = None, content: str = "") -> list[Message]:
    messages = [Message("system", (TextPart(system),))] if system else []
    return messages + [
        Message("user", (TextPart("Weather and time in Paris, café?"),)),
        Message("assistant", (TextPart(content),) if content else (), tool_calls=CALLS),
        Message("tool", (TextPart('{"temp": 21}'),), tool_call_id="call_1", name="get_weather"),
        Message("tool", (TextPart('"14:05"'),), tool_call_id="call_2", name="get_time"),
        Message("assistant", (TextPart("It is 21 C at 14:05."),)),
        Message("user", (TextPart("Thanks. And Rome?"),)),
    ]


def hf_messages(messages: list[Message]) -> list[dict]:
    """The conversation as Hugging Face templates take it (arguments as objects)."""
    out = []
    for m in messages:
        entry: dict = {"role": m.role, "content": m.text}
        if m.tool_calls:
            entry["tool_calls"] = [{"type": "function", "function": {
                "name": c.name, "arguments": json.loads(c.arguments)}} for c in m.tool_calls]
        out.append(entry)
    return out


def reference(tokenizer, messages: list[Message], tools, default_system: str) -> str:
    template = QWEN25_TOOL_TEMPLATE.replace("DEFAULT_SYSTEM", default_system)
    return tokenizer.apply_chat_template(
        hf_messages(messages), tools=[t.openai_dict() for t in tools] or None,
        chat_template=template, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("system", [None, "Be brief."])
@pytest.mark.parametrize("content", ["", "Let me look."])
@pytest.mark.parametrize("tools", [TOOLS, ()])
def test_smollm2_follows_qwen25_with_its_own_system(smollm2_tokenizer, system, content, tools):
    family = load_family("smollm2", smollm2_tokenizer)
    messages = conversation(system, content)
    assert family.render(messages, tools=tools) == reference(smollm2_tokenizer, messages, tools,
                                                             SMOLLM2_SYSTEM)


def test_smollm2_without_tools_is_its_own_template(smollm2_tokenizer):
    family = load_family("smollm2", smollm2_tokenizer)
    messages = [Message("user", (TextPart("hi"),))]
    assert family.render(messages) == smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def chatml_tok():
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<img>",
                "</img>", "<imgpad>", "<IMG_CONTEXT>", "<|action_start|>", "<|action_end|>",
                "<|plugin|>"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials)},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": specials[3:]})
    return tok


def test_qwen_style_chatml_follows_qwen25(chatml_tok):
    family = load_family("qwen-vl-chat", chatml_tok)
    messages = conversation(content="Let me look.")
    assert family.render(messages, tools=TOOLS) == reference(
        chatml_tok, messages, TOOLS, "You are a helpful assistant.")


def test_internlm2_agent_format(chatml_tok):
    family = load_family("internlm2-chat", chatml_tok)
    listing = json.dumps([WEATHER.function_dict(), TIME.function_dict()], ensure_ascii=False,
                         indent=4)
    assert family.render(conversation(content="Let me look."), tools=TOOLS) == (
        f"<|im_start|>system\n{INTERNLM2_SYSTEM}<|im_end|>\n"
        f"<|im_start|>system name=<|plugin|>\n{listing}<|im_end|>\n"
        "<|im_start|>user\nWeather and time in Paris, café?<|im_end|>\n"
        "<|im_start|>assistant\nLet me look."
        '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": '
        '{"city": "Paris", "unit": "C"}}<|action_end|>'
        '<|action_start|><|plugin|>\n{"name": "get_time", "parameters": '
        '{"zone": "Europe/Paris"}}<|action_end|><|im_end|>\n'
        '<|im_start|>environment name=<|plugin|>\n{"temp": 21}<|im_end|>\n'
        '<|im_start|>environment name=<|plugin|>\n"14:05"<|im_end|>\n'
        "<|im_start|>assistant\nIt is 21 C at 14:05.<|im_end|>\n"
        "<|im_start|>user\nThanks. And Rome?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert '"name": "get_weather"' in listing and '"description"' in listing


def test_generic_format_for_a_family_without_tools(chatml_tok):
    # LLaVA's Vicuna turns, with the Hermes-style blocks inside them.
    family = load_family("llava-vicuna", chatml_tok)
    text = family.render(conversation(), tools=(TIME,))
    assert text.startswith("A chat between a curious human")
    assert '<tools>\n{"type": "function", "function": {"name": "get_time"' in text
    assert ('ASSISTANT: <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "C"}}\n</tool_call>\n<tool_call>') in text
    assert ('USER: <tool_response>\n{"temp": 21}\n</tool_response>\n<tool_response>\n"14:05"\n'
            "</tool_response> ") in text
    assert text.endswith("USER: Thanks. And Rome? ASSISTANT:")
