"""Constrained output on the OpenAI surface: `response_format`, vLLM's `guided_*` extras and
its newer `structured_outputs` object, all mapped to one `StructuredOutput` of llm.proto.

A request names at most one constraint; the LLM engine compiles and enforces it (a schema it
cannot compile comes back as a 400 that names the construct).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, model_validator

from gateway.request_model import FieldError, RequestModel
from protos import llm_pb2

# A schema or grammar larger than this is refused before it reaches the engine's compiler.
MAX_CONSTRAINT_CHARS = 64 * 1024
MAX_CHOICES = 256


class JSONSchemaFormat(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    # OpenAI's field is `schema`; pydantic reserves that name on models.
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    # Accepted as OpenAI's strict mode: the engine always enforces the whole schema.
    strict: bool | None = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and only then")
        return self


class StructuredOutputs(RequestModel):
    """vLLM's `structured_outputs` object: exactly one of its fields."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StructuredFields(RequestModel):
    """The request fields that constrain the output; mixed into GenerationRequest."""

    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    def structured_to_pb(self) -> llm_pb2.StructuredOutput | None:
        """The one constraint the request names, or None for free text. Naming two is a 400."""
        found = self._constraints()
        if len(found) > 1:
            names = ", ".join(param for param, _ in found)
            raise FieldError(found[1][0], f"a request takes one output constraint, this one "
                             f"names {len(found)} ({names}); send only one")
        if not found:
            return None
        param, pb = found[0]
        _check_size(param, pb)
        return pb

    def _constraints(self) -> list[tuple[str, llm_pb2.StructuredOutput]]:
        found = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", llm_pb2.StructuredOutput(json_object=True)))
        if rf is not None and rf.json_schema is not None:
            found.append(("response_format.json_schema.schema",
                          llm_pb2.StructuredOutput(json_schema=_schema_text(rf.json_schema.schema_))))
        found += _found("guided_", self.guided_json, self.guided_regex, self.guided_choice,
                        self.guided_grammar)
        so = self.structured_outputs
        if so is not None:
            found += _found("structured_outputs.", so.json_, so.regex, so.choice, so.grammar)
            if so.json_object:
                found.append(("structured_outputs.json_object",
                              llm_pb2.StructuredOutput(json_object=True)))
        return found


def _found(prefix: str, schema: dict[str, Any] | str | None, regex: str | None,
           choice: list[str] | None, grammar: str | None
           ) -> list[tuple[str, llm_pb2.StructuredOutput]]:
    out = []
    json_name = "guided_json" if prefix == "guided_" else prefix + "json"
    if schema is not None:
        out.append((json_name, llm_pb2.StructuredOutput(json_schema=_schema_text(schema,
                                                                                 json_name))))
    if regex is not None:
        out.append((prefix + "regex", llm_pb2.StructuredOutput(regex=regex)))
    if choice is not None:
        if not choice or len(choice) > MAX_CHOICES:
            raise FieldError(prefix + "choice", f"give 1 to {MAX_CHOICES} strings")
        out.append((prefix + "choice", llm_pb2.StructuredOutput(
            choice=llm_pb2.ChoiceList(choices=choice))))
    if grammar is not None:
        out.append((prefix + "grammar", llm_pb2.StructuredOutput(grammar=grammar)))
    return out


def _schema_text(schema: dict[str, Any] | str, param: str = "response_format.json_schema"
                 ) -> str:
    if isinstance(schema, dict):
        return json.dumps(schema, separators=(",", ":"))
    try:
        parsed = json.loads(schema)
    except json.JSONDecodeError as exc:
        raise FieldError(param, f"not a JSON document ({exc.msg} at {exc.pos})") from None
    if not isinstance(parsed, dict):
        raise FieldError(param, "a JSON schema must be an object")
    return schema


def _check_size(param: str, pb: llm_pb2.StructuredOutput) -> None:
    kind = pb.WhichOneof("kind")
    text = "".join(pb.choice.choices) if kind == "choice" else getattr(pb, kind)
    if isinstance(text, str) and len(text) > MAX_CONSTRAINT_CHARS:
        raise FieldError(param, f"{len(text)} characters; the limit is {MAX_CONSTRAINT_CHARS}")
