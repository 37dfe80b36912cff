"""Chat templates: messages -> prompt text with one marker per media item.

A template renders the family's exact conversation format and leaves a marker
where each media item goes; `PromptBuilder` later replaces every marker with the
item's embedding slots once the encoder has said how many rows it produced.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

from llm_service.errors import InvalidRequest
from llm_service.prompt.messages import ROLES, MediaRef, Message, TextPart

MARKER = "<|mmserve_media_{}|>"
MARKER_RE = re.compile(r"<\|mmserve_media_(\d+)\|>")


class ChatTemplate(ABC):
    @abstractmethod
    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text, with MARKER.format(i) for the i-th media item in message order."""


def check_messages(messages: list[Message]) -> None:
    if not messages:
        raise InvalidRequest("messages must not be empty")
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role {message.role!r} is not one of {ROLES}")
        for part in message.parts:
            if isinstance(part, TextPart) and MARKER_RE.search(part.text):
                raise InvalidRequest(f"messages[{i}] contains a reserved media marker")


def inline_media(message: Message, counter: list[int], separator: str = "") -> str:
    """Message content with media items replaced by numbered markers, in order."""
    out = []
    for part in message.parts:
        if isinstance(part, MediaRef):
            out.append(MARKER.format(counter[0]) + separator)
            counter[0] += 1
        else:
            out.append(part.text)
    return "".join(out)


class HFChatTemplate(ChatTemplate):
    """The checkpoint's own Jinja chat template (tokenizer.apply_chat_template)."""

    def __init__(self, tokenizer) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template; choose a family template")
        self._tokenizer = tokenizer

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        check_messages(messages)
        counter = [0]
        conversation = [{"role": m.role, "content": inline_media(m, counter)} for m in messages]
        return self._tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
