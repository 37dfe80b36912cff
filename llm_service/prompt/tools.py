"""How each family shows tools, tool calls and tool results in its prompt.

Two formats:

- `HermesFormat` (Qwen2.5's chat template, which SmolLM2 and Qwen-style ChatML families follow,
  and the documented generic format of families whose own template has no tools): the tools
  as JSON lines inside `<tools></tools>` in the system turn, each call the assistant made as
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` in its turn, and tool results
  as `<tool_response>\\n...\\n</tool_response>` in a user turn (consecutive results share one).
  It rewrites the conversation and lets the family's own template render it, so the role
  markers stay the family's.
- `InternLM2Format` (InternLM2-Chat's agent format, its chat_format document): the tools in a
  `<|im_start|>system name=<|plugin|>` turn, calls as `<|action_start|><|plugin|>\\n{"name":
  ..., "parameters": {...}}<|action_end|>`, results in `<|im_start|>environment
  name=<|plugin|>` turns.

Each format also names the markers its tool-call parser looks for (llm_service.tool_calls).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llm_service.errors import InvalidRequest
from llm_service.prompt.messages import Message, TextPart, ToolCall
from llm_service.prompt.template import ChatTemplate, Media, MediaText, render_contents


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; parameters is its JSON Schema (None: any object)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None

    def openai_dict(self) -> dict[str, Any]:
        """The tool as OpenAI and Hugging Face chat templates receive it."""
        return {"type": "function", "function": self.function_dict()}

    def function_dict(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        return function


def _dumps(value: Any) -> str:
    # Hugging Face's `tojson` filter: json.dumps with non-ASCII kept.
    return json.dumps(value, ensure_ascii=False)


def arguments_object(call: ToolCall, where: str) -> Any:
    try:
        return json.loads(call.arguments) if call.arguments else {}
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{where}.arguments is not JSON ({exc.msg} at {exc.pos})") from None


def uses_tools(messages: Sequence[Message], tools: Sequence[Tool]) -> bool:
    return bool(tools) or any(m.tool_calls or m.role == "tool" for m in messages)


class ToolFormat(ABC):
    """A family's tool syntax: prompt rendering and the markers around each call."""

    call_start: str
    call_end: str
    arguments_keys: tuple[str, ...]  # the wrapper's key for the arguments, preferred first
    # Markers that are special tokens: the detokenizer must keep them for the parser.
    special_markers: bool = False

    @abstractmethod
    def render(self, template: ChatTemplate, messages: list[Message], media: Media,
               tools: Sequence[Tool], add_generation_prompt: bool = True) -> str:
        """The prompt: `messages` passed check_messages; tool turns may be among them."""


@dataclass(frozen=True, slots=True)
class HermesFormat(ToolFormat):
    default_system: str  # the family's default system prompt, kept in front of the tools
    call_start: str = "<tool_call>"
    call_end: str = "</tool_call>"
    arguments_keys: tuple[str, ...] = ("arguments", "parameters")
    special_markers: bool = False

    def render(self, template: ChatTemplate, messages: list[Message], media: Media,
               tools: Sequence[Tool], add_generation_prompt: bool = True) -> str:
        return template.render(self.rewrite(messages, tools), media, add_generation_prompt)

    def rewrite(self, messages: list[Message], tools: Sequence[Tool]) -> list[Message]:
        """The conversation with tools, calls and results as plain system/user/assistant text."""
        out: list[Message] = []
        if tools:
            listing = "\n".join(_dumps(tool.openai_dict()) for tool in tools)
            system = messages[0].parts if messages[0].role == "system" else (
                TextPart(self.default_system),)
            out.append(Message("system", (*system, TextPart(
                "\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
                "\n\nYou are provided with function signatures within <tools></tools> XML tags:"
                f"\n<tools>\n{listing}\n</tools>\n\nFor each function call, return a json object"
                " with function name and arguments within <tool_call></tool_call> XML tags:\n"
                '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
                "</tool_call>"))))
            if messages[0].role == "system":
                messages = messages[1:]
        for i, message in enumerate(messages):
            if message.role == "tool":
                block = TextPart(f"<tool_response>\n{message.text}\n</tool_response>")
                if out and out[-1].role == "user" and i and messages[i - 1].role == "tool":
                    out[-1] = Message("user", (*out[-1].parts, TextPart("\n"), block))
                else:
                    out.append(Message("user", (block,)))
            elif message.tool_calls:
                calls = [self.render_call(call, f"messages[{i}].tool_calls[{k}]")
                         for k, call in enumerate(message.tool_calls)]
                text = "\n".join(calls)
                lead = (TextPart("\n"),) if message.text else ()
                out.append(Message("assistant", (*message.parts, *lead, TextPart(text))))
            else:
                out.append(message)
        return out

    def render_call(self, call: ToolCall, where: str) -> str:
        arguments = _dumps(arguments_object(call, where))
        return f'{self.call_start}\n{{"name": "{call.name}", "arguments": {arguments}}}\n' \
               f"{self.call_end}"


@dataclass(frozen=True, slots=True)
class InternLM2Format(ToolFormat):
    default_system: str
    end_sep: str  # after <|im_end|>: "\n" for InternLM2-Chat, "" in InternVL2's MPT style
    media_text: MediaText
    call_start: str = "<|action_start|><|plugin|>"
    call_end: str = "<|action_end|>"
    arguments_keys: tuple[str, ...] = ("parameters", "arguments")
    special_markers: bool = True

    def render(self, template: ChatTemplate, messages: list[Message], media: Media,
               tools: Sequence[Tool], add_generation_prompt: bool = True) -> str:
        contents = render_contents(messages, self.media_text, media)
        end = "<|im_end|>" + self.end_sep
        system = self.default_system
        if messages[0].role == "system":
            system, messages, contents = contents[0], messages[1:], contents[1:]
        out = [f"<|im_start|>system\n{system}{end}"] if system else []
        if tools:
            listing = json.dumps([tool.function_dict() for tool in tools], ensure_ascii=False,
                                 indent=4)
            out.append(f"<|im_start|>system name=<|plugin|>\n{listing}{end}")
        for i, (message, content) in enumerate(zip(messages, contents)):
            if message.role == "system":
                raise InvalidRequest("a system message is only allowed first")
            if message.role == "tool":
                out.append(f"<|im_start|>environment name=<|plugin|>\n{content}{end}")
            elif message.role == "user":
                out.append(f"<|im_start|>user\n{content}{end}")
            else:
                calls = "".join(self.render_call(call, f"messages[{i}].tool_calls[{k}]")
                                for k, call in enumerate(message.tool_calls))
                out.append(f"<|im_start|>assistant\n{content}{calls}{end}")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)

    def render_call(self, call: ToolCall, where: str) -> str:
        body = _dumps({"name": call.name, "parameters": arguments_object(call, where)})
        return f"{self.call_start}\n{body}{self.call_end}"
