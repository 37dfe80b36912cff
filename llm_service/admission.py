"""Admission of a request's media before any of it is encoded.

Encoding is the expensive part of a multimodal request, and a request whose media cannot
fit the context fails anyway once the prompt is built. So before the Encode calls the
encoder is asked for a plan (rows per item from the image headers and the family's tiling
rule; nothing decoded), and a request whose rows plus text cannot fit `max_model_len` is
refused at once. One image is bounded by the encoder's tile limit and is not planned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llm_service.encoder_client import EncoderClient
from llm_service.errors import InvalidRequest
from llm_service.prompt.messages import MediaItem, Message, Modality, media_count


def needs_plan(media: Sequence[MediaItem]) -> bool:
    """Whether the media may need more rows than one image can: several items, or video."""
    return sum(media_count(m) for m in media) > 1 or \
        any(m.modality == Modality.VIDEO for m in media)


async def check_media_fit(encoder: EncoderClient, tokenizer: Any, messages: Sequence[Message],
                          media: Sequence[MediaItem], max_model_len: int, request_id: str,
                          timeout: float | None, tenant: str = "") -> None:
    """Raises InvalidRequest when the media's planned rows and the text cannot fit."""
    if not needs_plan(media):
        return
    plans = await encoder.plan(list(media), request_id, timeout, tenant)
    rows = sum(p.num_tokens for p in plans)
    text = sum(len(tokenizer.encode(m.text)) for m in messages if m.text)
    # One position stays free for output, as the engine requires.
    if rows + text > max_model_len - 1:
        per_item = ", ".join(str(p.num_tokens) for p in plans)
        raise InvalidRequest(
            f"the media in this request would take {rows} embedding rows ({per_item} per "
            f"item) and the text about {text} tokens, more than the {max_model_len}-token "
            f"context; send fewer or smaller images, a lower max_tiles or fewer video frames")
