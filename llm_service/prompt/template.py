"""Chat templates: messages -> prompt text with one marker per media item.

A template renders a family's exact conversation format and leaves a marker
where each media item goes; `PromptBuilder` later replaces every marker with the
item's embedding slots once the encoder has said how many rows it produced.
Most families are "role templates": a system block, then per turn a role prefix,
the content and a role-specific terminator, then the generation prompt.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llm_service.errors import InvalidRequest
from llm_service.prompt.messages import ROLES, MediaItem, Message, Modality, TextPart
from mmserve.wire.media import EncodedItem

# Per media part, in message order: the items the encoder returned for it (one per frame
# for a video). None renders one slot per part (one per frame of a frame list).
Media = Sequence[Sequence[EncodedItem]] | None

MARKER = "<|mmserve_media_{}|>"
MARKER_RE = re.compile(r"<\|mmserve_media_(\d+)\|>")


@dataclass(frozen=True, slots=True)
class MediaSlot:
    """Where a media item sits, for families whose text around it depends on that."""

    modality: Modality
    index: int  # 0-based over the whole conversation, all modalities
    in_message: int  # 0-based among this modality's items in its message
    of_modality: int  # 0-based among this modality's items in the conversation
    total: int  # items of this modality in the conversation
    frame: int = 0  # 1-based frame number for video frames


MediaText = Callable[[MediaSlot], str]


def bare(slot: MediaSlot) -> str:
    return MARKER.format(slot.index)


class ChatTemplate(ABC):
    @abstractmethod
    def render(self, messages: list[Message], media: Media = None,
               add_generation_prompt: bool = True) -> str:
        """The prompt text, with MARKER.format(i) for the i-th media slot in message order
        (a video has one slot per frame). `messages` passed check_messages."""


def check_messages(messages: list[Message]) -> None:
    """The one check of a conversation, before any media is encoded."""
    if not messages:
        raise InvalidRequest("messages must not be empty")
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role {message.role!r} is not one of {ROLES}")
        if message.tool_calls and message.role != "assistant":
            raise InvalidRequest(f"messages[{i}].tool_calls: only assistant messages make calls")
        if message.role == "tool" and message.media:
            raise InvalidRequest(f"messages[{i}]: a tool result is text only")
        for part in message.parts:
            if isinstance(part, TextPart) and MARKER_RE.search(part.text):
                raise InvalidRequest(f"messages[{i}] contains a reserved media marker")


def slot_frames(part: MediaItem, items: Sequence[EncodedItem] | None) -> list[int]:
    """The frame number of each slot of a media part (0: not a frame)."""
    if items is not None:
        return [item.frame for item in items]
    if part.frames:
        return list(range(1, len(part.frames) + 1))
    return [0]


def render_contents(messages: list[Message], media_text: MediaText,
                    media: Media = None) -> list[str]:
    """Each message's content with its media slots rendered by `media_text`, in order.

    A video's frames are image slots, numbered by their frame field, not counted as images.
    """
    parts = [p for msg in messages for p in msg.parts if isinstance(p, MediaItem)]
    if media is not None and len(media) != len(parts):
        raise ValueError(f"{len(media)} encoded media for {len(parts)} media parts")
    frames = iter(slot_frames(p, media[i] if media is not None else None)
                  for i, p in enumerate(parts))
    totals = {m: sum(p.modality == m for p in parts) for m in Modality}
    seen = dict.fromkeys(Modality, 0)
    index = 0
    out = []
    for message in messages:
        in_message = dict.fromkeys(Modality, 0)
        pieces: list[str] = []
        for part in message.parts:
            if isinstance(part, TextPart):
                pieces.append(part.text)
                continue
            modality = part.modality
            for frame in next(frames):
                shown = Modality.IMAGE if frame else modality
                pieces.append(media_text(MediaSlot(shown, index, in_message[modality],
                                                   seen[modality], totals[modality], frame)))
                index += 1
            if modality != Modality.VIDEO:
                in_message[modality] += 1
                seen[modality] += 1
        out.append("".join(pieces))
    return out


class HFChatTemplate(ChatTemplate):
    """The checkpoint's own Jinja chat template (tokenizer.apply_chat_template)."""

    def __init__(self, tokenizer: Any, media_text: MediaText = bare) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template; choose a family template")
        self._tokenizer = tokenizer
        self._media_text = media_text

    def render(self, messages: list[Message], media: Media = None,
               add_generation_prompt: bool = True) -> str:
        contents = render_contents(messages, self._media_text, media)
        conversation = [{"role": m.role, "content": c} for m, c in zip(messages, contents)]
        text: str = self._tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
        return text


@dataclass(frozen=True, slots=True)
class RoleTemplate(ChatTemplate):
    """system block + (prefix, content, end) per turn + generation prompt."""

    system: str  # format string with {system}; "" when the family has no system block
    system_end: str
    user: str
    user_end: str
    assistant: str
    assistant_end: str
    generation: str  # appended when add_generation_prompt
    default_system: str = ""
    media_text: MediaText = bare
    # Families without a system block put it inside the first user turn (e.g. Llama-2 <<SYS>>).
    system_in_first_user: str = ""

    def render(self, messages: list[Message], media: Media = None,
               add_generation_prompt: bool = True) -> str:
        contents = render_contents(messages, self.media_text, media)
        system = self.default_system
        if messages[0].role == "system":
            system, messages, contents = contents[0], messages[1:], contents[1:]
        out = []
        if self.system and system:
            out.append(self.system.format(system=system) + self.system_end)
        first_user = True
        for message, content in zip(messages, contents):
            if message.role == "system":
                raise InvalidRequest("a system message is only allowed first")
            if message.role == "user":
                if first_user and system and self.system_in_first_user:
                    content = self.system_in_first_user.format(system=system) + content
                first_user = False
                out.append(self.user + content + self.user_end)
            else:
                out.append(self.assistant + content + self.assistant_end)
        if add_generation_prompt:
            out.append(self.generation)
        return "".join(out)
