"""Protobuf <-> the shared media types, for the two edges of the Encode call.

The LLM service's encoder client sends `item_to_pb` and reads `item_from_header`; the
encoder's servicer reads `item_from_pb` and sends `header_to_pb`.
"""

from __future__ import annotations

from typing import cast

import torch

from mmserve.wire.chunks import dtype_to_pb
from mmserve.wire.media import EncodedItem, MediaItem, MediaRef, Modality
from protos import common_pb2, encoder_pb2


def ref_to_pb(ref: MediaRef) -> common_pb2.MediaRef:
    pb = common_pb2.MediaRef(mime_type=ref.mime_type)
    if ref.data:
        pb.data = ref.data
    else:
        pb.url = ref.url
    return pb


def ref_from_pb(pb: common_pb2.MediaRef) -> MediaRef:
    return MediaRef(url=pb.url, data=pb.data, mime_type=pb.mime_type)


def modality_from_pb(value: int) -> Modality:
    """UNSPECIFIED means an image, as older callers sent it; unknown values are refused."""
    if value == common_pb2.MODALITY_UNSPECIFIED:
        return Modality.IMAGE
    try:
        return Modality(value)
    except ValueError:
        raise ValueError(f"unknown modality {value}; expected image, audio or video") from None


def modality_to_pb(modality: Modality) -> common_pb2.Modality:
    return cast(common_pb2.Modality, int(modality))  # the values are common.proto's


def item_to_pb(item: MediaItem) -> encoder_pb2.MediaItem:
    return encoder_pb2.MediaItem(
        modality=modality_to_pb(item.modality), ref=ref_to_pb(item.ref), max_tiles=item.max_tiles,
        num_frames=item.num_frames, frames=[ref_to_pb(frame) for frame in item.frames])


def item_from_pb(pb: encoder_pb2.MediaItem) -> MediaItem:
    """Raises ValueError for an unknown modality."""
    return MediaItem(ref_from_pb(pb.ref) if pb.HasField("ref") else MediaRef(),
                     modality_from_pb(pb.modality), max_tiles=pb.max_tiles,
                     num_frames=pb.num_frames,
                     frames=tuple(ref_from_pb(frame) for frame in pb.frames))


def header_to_pb(item: EncodedItem, media_index: int) -> encoder_pb2.ItemHeader:
    return encoder_pb2.ItemHeader(
        num_tokens=item.num_tokens, hidden_size=item.hidden_size,
        dtype=dtype_to_pb(item.embeddings.dtype), content_hash=item.content_hash,
        num_tiles=item.num_tiles, handle=item.handle, frame=item.frame,
        media_index=media_index, cached=item.cached)


def item_from_header(header: encoder_pb2.ItemHeader, rows: torch.Tensor) -> EncodedItem:
    return EncodedItem(rows, header.content_hash, header.handle, header.num_tiles,
                       frame=header.frame, cached=header.cached)
