"""Tool calling on the OpenAI surface: `tools`, `tool_choice`, `parallel_tool_calls`, the
assistant's `tool_calls` and `tool` messages, mapped to llm.proto.

The LLM service renders the tools in the family's prompt format, parses the model's calls and
enforces `required` and a named function with a grammar; the gateway checks the request's
shape and streams the calls back in OpenAI's format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from gateway.request_model import FieldError, RequestModel
from protos import llm_pb2

# OpenAI's rule for function names, and its limit on tools per request.
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"
MAX_TOOLS = 128


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestModel):
    name: str = Field(min_length=1)


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(RequestModel):
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(RequestModel):
    id: str = Field(min_length=1)
    type: Literal["function"]
    function: FunctionCall


class ToolFields(RequestModel):
    """The chat request fields about tools; mixed into ChatCompletionRequest."""

    tools: list[ToolDefinition] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _choice_names_a_tool(self) -> ToolFields:
        choice = self.tool_choice
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise FieldError("tool_choice.function.name",
                             f"{choice.function.name!r} is not one of the tools "
                             f"({', '.join(names) or 'none given'}); name a function in tools")
        if choice == "required" and not names:
            raise FieldError("tool_choice", "'required' needs at least one function in tools")
        return self

    def tools_to_pb(self, pb: llm_pb2.GenerateRequest) -> None:
        if not self.tools or self.tool_choice == "none":
            # "none": the model answers in text, and the prompt does not offer the tools.
            return
        pb.tools.extend(llm_pb2.Tool(
            name=tool.function.name, description=tool.function.description or "",
            parameters=json.dumps(tool.function.parameters) if tool.function.parameters
            else "", strict=bool(tool.function.strict))
            for tool in self.tools)
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            pb.tool_choice.function = choice.function.name
        elif choice == "required":
            pb.tool_choice.mode = llm_pb2.TOOL_CHOICE_REQUIRED
        else:
            pb.tool_choice.mode = llm_pb2.TOOL_CHOICE_AUTO
        if self.parallel_tool_calls is not None:
            pb.parallel_tool_calls = self.parallel_tool_calls


def tool_calls_to_pb(calls: Sequence[ToolCall] | None, param: str) -> list[llm_pb2.ToolCall]:
    out = []
    for i, call in enumerate(calls or []):
        try:
            json.loads(call.function.arguments)
        except json.JSONDecodeError as exc:
            where = f"{param}.{i}.function.arguments"
            raise FieldError(where, f"not JSON ({exc.msg} at {exc.pos})") from None
        out.append(llm_pb2.ToolCall(id=call.id, name=call.function.name,
                                    arguments=call.function.arguments))
    return out
