from __future__ import annotations

import pytest
import torch

from llm_service.encoder_client import EncodedItem
from llm_service.errors import Unavailable
from llm_service.generator import expand_videos
from llm_service.prompt.messages import MediaRef, Message, Modality, TextPart
from llm_service.server import messages_from_pb
from protos import common_pb2, llm_pb2


def test_sampled_video_becomes_frames_with_their_rows():
    video = MediaRef(Modality.VIDEO, url="file:///v.mp4", num_frames=3)
    image = MediaRef(Modality.IMAGE, url="data:x")
    rows = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(12, 2)
    encoded = [EncodedItem(torch.zeros(5, 2), "img", 1), EncodedItem(rows, "vid", 3)]
    messages, items = expand_videos([Message("user", (image, TextPart("a"), video))], encoded)
    parts = messages[0].parts
    assert parts[0] is image and parts[1] == TextPart("a")
    assert [p.frame for p in parts[2:]] == [1, 2, 3]
    assert all(p.modality == Modality.IMAGE for p in parts[2:])
    assert [i.content_hash for _, i in items] == ["img", "vid:0", "vid:1", "vid:2"]
    assert torch.equal(items[2][1].embeddings, rows[4:8])


def test_uneven_frame_rows_are_an_encoder_error():
    with pytest.raises(Unavailable, match="10 rows for 3 frames"):
        EncodedItem(torch.zeros(10, 2), "v", 3).frames()


def test_video_parts_from_pb():
    frames = llm_pb2.Video(frames=[common_pb2.MediaRef(url=f"data:{i}") for i in range(2)])
    file = llm_pb2.Video(file=common_pb2.MediaRef(url="file:///v.mp4"), num_frames=8)
    (msg,) = messages_from_pb([llm_pb2.ChatMessage(role="user", content=[
        llm_pb2.ContentPart(video=frames), llm_pb2.ContentPart(video=file)])])
    a, b, c = msg.media
    assert (a.frame, a.max_tiles, b.frame) == (1, 1, 2)
    assert c.modality == Modality.VIDEO and c.num_frames == 8
