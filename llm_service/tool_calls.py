"""Tool calls in, tool calls out: the request's tools and choice, the JSON schema that enforces
`required` and a named function, and the streaming parser that turns a choice's text into
OpenAI-style tool-call deltas.

With `auto`, the model writes calls in its family's syntax (`<tool_call>...</tool_call>`,
`<|action_start|><|plugin|>...<|action_end|>`) among ordinary text. With `required` or a named
function the engine's guided decoding holds the output to the call wrapper itself,
`{"name": ..., "arguments": {...}}` (a list of them when parallel calls are allowed), whose
arguments follow the function's parameters schema, so they always parse and validate.

A call streams as OpenAI streams it: one delta with its index, id and name as soon as the name
is out, then argument fragments as the model writes them; concatenated, the deltas are the
call, and the non-streamed answer is exactly that concatenation.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_service.errors import InvalidRequest
from llm_service.prompt.tools import Tool, ToolFormat


class ChoiceMode(enum.Enum):
    AUTO = "auto"
    REQUIRED = "required"
    FUNCTION = "function"  # exactly the named function


@dataclass(frozen=True, slots=True)
class ToolRequest:
    tools: tuple[Tool, ...]
    mode: ChoiceMode = ChoiceMode.AUTO
    function: str = ""  # with ChoiceMode.FUNCTION
    parallel: bool = True

    def __post_init__(self) -> None:
        names = [tool.name for tool in self.tools]
        if len(set(names)) != len(names):
            raise InvalidRequest("tools: function names must be unique")
        if self.mode is ChoiceMode.FUNCTION and self.function not in names:
            raise InvalidRequest(f"tool_choice.function {self.function!r} is not one of the "
                                 f"tools ({', '.join(names) or 'none given'})")
        if self.mode is ChoiceMode.REQUIRED and not names:
            raise InvalidRequest("tool_choice 'required' needs at least one tool")

    @property
    def constrained(self) -> bool:
        return self.mode is not ChoiceMode.AUTO

    def schema(self, arguments_key: str = "arguments") -> str:
        """The JSON schema of the output under `required` or a named function."""
        tools = [t for t in self.tools
                 if self.mode is not ChoiceMode.FUNCTION or t.name == self.function]
        calls = [{"type": "object", "properties": {
            "name": {"type": "string", "enum": [tool.name]},
            arguments_key: tool.parameters if tool.parameters else {"type": "object"}},
            "required": ["name", arguments_key], "additionalProperties": False}
            for tool in tools]
        call: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.parallel and self.mode is ChoiceMode.REQUIRED:
            call = {"type": "array", "items": call, "minItems": 1}
        return json.dumps(call, ensure_ascii=False)


def parse_tool_parameters(text: str, name: str) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        parameters = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"tools[{name}].parameters is not JSON ({exc.msg} at "
                             f"{exc.pos})") from None
    if not isinstance(parameters, dict):
        raise InvalidRequest(f"tools[{name}].parameters must be a JSON schema object")
    return parameters


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(slots=True)
class Parsed:
    """What one piece of a choice's text became: plain text and call deltas."""

    text: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


# The wrapper up to its arguments value, in either key order's first half. Between calls of
# a constrained list there are commas, brackets and whitespace.
_HEAD = re.compile(r'[\s\[,]*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(\w+)"\s*:\s*')
_HEAD_LIMIT = 256  # a head this long that does not match is not a call's


class _State(enum.Enum):
    TEXT = 0  # ordinary text, watching for the start marker
    HEAD = 1  # inside a call, before its arguments value
    ARGS = 2  # streaming the arguments value
    TAIL = 3  # after the value: the wrapper's "}" and the end marker
    RAW = 4  # a call this parser cannot stream: buffered to the end marker, parsed whole


class ToolCallParser:
    """Splits one choice's streamed text into plain text and tool-call deltas."""

    def __init__(self, request: ToolRequest, fmt: ToolFormat) -> None:
        self._names = {tool.name for tool in request.tools}
        if request.mode is ChoiceMode.FUNCTION:
            self._names = {request.function}
        self._fmt = fmt
        self._parallel = request.parallel
        self._constrained = request.constrained
        self._state = _State.HEAD if self._constrained else _State.TEXT
        self._buf = ""
        self._calls = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._started = False

    @property
    def made_calls(self) -> bool:
        return self._calls > 0

    def feed(self, text: str) -> Parsed:
        out = Parsed()
        self._buf += text
        while self._step(out):
            pass
        return out

    def finish(self) -> Parsed:
        """The end of the choice: whatever is held back leaves as text or a last call."""
        out = Parsed()
        if self._state is _State.RAW or (self._state is _State.HEAD
                                          and self._buf.strip(" \n\t]")):
            if self._constrained:
                out.text += self._buf
            else:
                self._emit_raw(self._buf, out)
        elif self._state is _State.TEXT:
            out.text += self._buf
        self._buf = ""
        return out

    def _step(self, out: Parsed) -> bool:
        """Moves as far as the buffered text allows; True when it should run again."""
        if self._state is _State.TEXT:
            return self._step_text(out)
        if self._state is _State.HEAD:
            return self._step_head(out)
        if self._state is _State.ARGS:
            return self._step_args(out)
        if self._state is _State.TAIL:
            return self._step_tail()
        return self._step_raw(out)

    def _step_text(self, out: Parsed) -> bool:
        if self._calls and not self._parallel:
            # parallel_tool_calls false: one call at most; what follows it is text.
            out.text += self._buf
            self._buf = ""
            return False
        start = self._fmt.call_start
        at = self._buf.find(start)
        if at >= 0:
            out.text += self._buf[:at]
            self._buf = self._buf[at + len(start):]
            self._state = _State.HEAD
            return True
        keep = _partial_suffix(self._buf, start)
        out.text += self._buf[:len(self._buf) - keep]
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _step_head(self, out: Parsed) -> bool:
        match = _HEAD.match(self._buf)
        if match is None:
            if self._constrained or (len(self._buf) < _HEAD_LIMIT
                                     and self._fmt.call_end not in self._buf):
                return False
            self._state = _State.RAW
            return True
        name, key = json.loads(f'"{match.group(1)}"'), match.group(2)
        if name not in self._names or key not in self._fmt.arguments_keys:
            if self._constrained:
                return False  # the grammar allows neither; nothing to stream
            self._state = _State.RAW
            return True
        out.calls.append(ToolCallDelta(self._calls, _call_id(), name, ""))
        self._buf = self._buf[match.end():]
        self._state = _State.ARGS
        self._depth, self._in_string, self._escaped, self._started = 0, False, False, False
        return True

    def _step_args(self, out: Parsed) -> bool:
        if not self._started:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._started = True
        for i, char in enumerate(self._buf):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
            if self._depth == 0 and not self._in_string:
                # The value ended here (an object, list or string at the top).
                fragment, self._buf = self._buf[:i + 1], self._buf[i + 1:]
                out.calls.append(ToolCallDelta(self._calls, arguments=fragment))
                self._calls += 1
                self._state = _State.TAIL
                return True
        out.calls.append(ToolCallDelta(self._calls, arguments=self._buf))
        self._buf = ""
        return False

    def _step_tail(self) -> bool:
        if self._constrained:
            closed = self._buf.find("}")
            if closed < 0:
                return False
            self._buf = self._buf[closed + 1:]
            self._state = _State.HEAD
            return True
        end = self._buf.find(self._fmt.call_end)
        if end < 0:
            return False
        self._buf = self._buf[end + len(self._fmt.call_end):]
        self._state = _State.TEXT
        return True

    def _step_raw(self, out: Parsed) -> bool:
        end = self._buf.find(self._fmt.call_end)
        if end < 0:
            return False
        body, self._buf = self._buf[:end], self._buf[end + len(self._fmt.call_end):]
        self._emit_raw(body, out, closed=True)
        self._state = _State.TEXT
        return True

    def _emit_raw(self, body: str, out: Parsed, closed: bool = False) -> None:
        """A whole call the streaming path could not follow, or the text it really was."""
        try:
            parsed = json.loads(body)
        except json.JSONDecodeError:
            parsed = None
        key = next((k for k in self._fmt.arguments_keys
                    if isinstance(parsed, dict) and k in parsed), None)
        if key is None or parsed.get("name") not in self._names:
            out.text += self._fmt.call_start + body + (self._fmt.call_end if closed else "")
            return
        arguments = json.dumps(parsed[key], ensure_ascii=False)
        out.calls += [ToolCallDelta(self._calls, _call_id(), parsed["name"], ""),
                      ToolCallDelta(self._calls, arguments=arguments)]
        self._calls += 1


def _partial_suffix(text: str, marker: str) -> int:
    """How many trailing characters of `text` could begin `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tools_from(raw: Sequence[tuple[str, str, str]]) -> tuple[Tool, ...]:
    """(name, description, parameters JSON text) triples as Tools."""
    return tuple(Tool(name, description, parse_tool_parameters(parameters, name))
                 for name, description, parameters in raw)
