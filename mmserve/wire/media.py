"""What both services say about media: modality, references, encoded items, handles.

One vocabulary on both sides of the Encode call: the LLM service builds `MediaItem`s
from chat parts, the encoder resolves them and answers with `EncodedItem`s.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

HANDLE_PREFIX = "mm://sha256:"
_HANDLE = re.compile(re.escape(HANDLE_PREFIX) + "([0-9a-f]{64})")
# Longer URLs are not looked at: a handle is exactly this long.
HANDLE_LENGTH = len(HANDLE_PREFIX) + 64
# gRPC metadata naming the caller's tenant (an opaque id the gateway derives from the API key);
# handles resolve only for the tenant that uploaded them. Absent: the shared default tenant.
TENANT_METADATA = "x-mmserve-tenant"
_TENANT = re.compile("[0-9a-f]{1,64}")
# Messages of UNAVAILABLE errors caused by the shared media store start with this: the
# encoder itself is fine, so callers neither eject it nor retry the call elsewhere.
MEDIA_STORE_UNAVAILABLE = "media store unavailable"


class Modality(enum.IntEnum):
    """Values equal common.proto's Modality."""

    IMAGE = 1
    AUDIO = 2
    VIDEO = 3  # a file the encoder samples into frames, or frames the client sent

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class MediaRef:
    """Where one piece of media comes from: a URL (http(s), data:, file:, mm://) or bytes."""

    url: str = ""
    data: bytes = b""
    mime_type: str = ""  # optional hint from the client


@dataclass(frozen=True, slots=True)
class MediaItem:
    """One media part of a request, as the encoder is asked to encode it."""

    ref: MediaRef = MediaRef()  # the image, audio clip or video file
    modality: Modality = Modality.IMAGE
    max_tiles: int = 0  # 0: the encoder's default
    num_frames: int = 0  # video file: frames to sample; 0: the encoder's default
    frames: tuple[MediaRef, ...] = ()  # video only, instead of `ref`: the client's frames


@dataclass(frozen=True, slots=True)
class EncodedItem:
    """Embedding rows of one image, audio clip or video frame, and what names them."""

    embeddings: torch.Tensor  # [num_tokens, hidden_size]
    content_hash: str  # sha256 hex of the decoded content + preprocessing parameters
    handle: str  # what a later request may send instead of the media (see encoder.proto)
    num_tiles: int  # tiles, slices or audio windows
    frame: int = 0  # 1-based frame number within its video; 0: not a frame
    cached: bool = False  # served from the encoder's content store

    @property
    def num_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.embeddings.shape[1])


def handle_for(content_hash: str) -> str:
    """The `mm://sha256:<hex>` handle of stored content."""
    return HANDLE_PREFIX + content_hash


def parse_handle(url: str) -> str | None:
    """The hex digest of an `mm://sha256:<64 hex>` URL; None when it is not one (checked
    for length first, so a long string costs nothing)."""
    if len(url) != HANDLE_LENGTH:
        return None
    match = _HANDLE.fullmatch(url)
    return match.group(1) if match else None


def valid_tenant(tenant: str) -> bool:
    """Whether `tenant` is a well-formed tenant id: empty (the default) or 1-64 lowercase hex."""
    return not tenant or _TENANT.fullmatch(tenant) is not None


def source_hash(modality: Modality, data: bytes) -> str:
    """The digest of an `mm://` handle for media uploaded as `data`: sha256 over the modality
    and the file bytes, so the LLM service computes it from a request's bytes without
    decoding them and sends the item to the encoder replica that saw it before."""
    digest = hashlib.sha256(f"{modality.label};".encode())
    digest.update(data)
    return digest.hexdigest()


def routing_key(item: MediaItem) -> str | None:
    """What places `item` on an encoder replica: its handle's digest, or the `source_hash`
    of its bytes (inline or a base64 data: URL); None for anything else (http(s), file:)."""
    ref = item.frames[0] if item.frames else item.ref
    modality = Modality.IMAGE if item.frames else item.modality
    if ref.data:
        return source_hash(modality, ref.data)
    digest = parse_handle(ref.url)
    if digest is not None:
        return digest
    if ref.url.startswith("data:"):
        header, comma, payload = ref.url.partition(",")
        if comma and header.endswith(";base64"):
            try:
                return source_hash(modality, base64.b64decode(payload, validate=True))
            except (binascii.Error, ValueError):
                return None  # the encoder explains what is wrong with it
    return None
