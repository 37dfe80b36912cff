"""The one rule for request fields, for every request body the gateway accepts.

- A field the gateway implements is declared on its model, with OpenAI's types and strictness:
  a boolean is a JSON boolean ("yes" is a 400), an integer a JSON integer (1.5 and "1" are 400s).
- A purely informational OpenAI field (`INFORMATIONAL`) is accepted and ignored.
- Any other field is a 400 that names it: a parameter the server would silently ignore is worse
  than an error (the README lists what is implemented).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

# Accepted on chat and completions requests and ignored: they describe the caller or ask
# OpenAI's own platform to keep the request, and change nothing in the output.
INFORMATIONAL = frozenset({"user", "metadata", "store"})


class RequestModel(BaseModel):
    """Base of every request model: strict types, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=False)


class TopLevelRequest(RequestModel):
    """A whole request body: the informational fields are dropped before validation."""

    @model_validator(mode="before")
    @classmethod
    def _drop_informational(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if key not in INFORMATIONAL}
        return data


class FieldError(Exception):
    """A request field the schema alone cannot judge (a tool_choice naming no tool, two output
    constraints at once): a 400 whose message starts with the field's name."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = f"{param}: {message}"
