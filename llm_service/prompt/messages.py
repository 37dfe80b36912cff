"""Chat messages as the LLM service sees them, independent of protobuf.

Media parts are the `MediaItem`s sent to the encoder (mmserve.wire.media), so one
vocabulary names media on both sides of the Encode call.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmserve.wire.media import MediaItem, MediaRef, Modality

ROLES = ("system", "user", "assistant", "tool")
# OpenAI's newer name for the system role; chat templates know system/user/assistant only.
ROLE_ALIASES = {"developer": "system"}


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


Part = TextPart | MediaItem


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the assistant made (or makes): its arguments as JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Message:
    """One turn; a role alias ("developer") becomes the role it stands for."""

    role: str
    parts: tuple[Part, ...]
    tool_calls: tuple[ToolCall, ...] = ()  # assistant: the calls it made
    tool_call_id: str = ""  # tool: the call this result answers
    name: str = ""  # tool: the function's name

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", ROLE_ALIASES.get(self.role, self.role))

    @property
    def media(self) -> tuple[MediaItem, ...]:
        return tuple(p for p in self.parts if isinstance(p, MediaItem))

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


def media_count(item: MediaItem) -> int:
    """Media items the part stands for: each frame of a video sent as frames counts."""
    return len(item.frames) if item.frames else 1


__all__ = ["ROLES", "MediaItem", "MediaRef", "Message", "Modality", "Part", "TextPart",
           "ToolCall", "media_count"]
