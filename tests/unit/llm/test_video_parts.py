"""Videos on the LLM side: one media part, as many image slots as the encoder sent frames."""

from __future__ import annotations

import torch

from llm_service.encoder_client import PlannedItem
from llm_service.engine.protocol import EngineOutput, EngineRequest, FinishReason
from llm_service.generator import GenerateInput, Generator
from llm_service.prompt.families import load_family
from llm_service.prompt.messages import MediaItem, MediaRef, Message, Modality, TextPart
from llm_service.server import messages_from_pb
from mmserve.wire.media import EncodedItem
from protos import common_pb2, llm_pb2


class FakeEncoder:
    """Answers every media item with the items given for it, in order."""

    def __init__(self, answers: list[list[EncodedItem]]) -> None:
        self.answers = answers
        self.asked: list[MediaItem] = []

    async def encode(self, items, request_id, timeout=None, tenant=""):
        self.asked = list(items)
        return self.answers

    async def plan(self, items, request_id, timeout=None, tenant=""):
        return [PlannedItem(sum(e.num_tokens for e in answer), len(answer), 0)
                for answer in self.answers]


class RecordingEngine:
    hidden_size, vocab_size, max_model_len = 2, 49152, 8192

    def __init__(self) -> None:
        self.requests: list[EngineRequest] = []

    async def generate(self, request):
        self.requests.append(request)
        yield EngineOutput(request.request_id, 0, [1], FinishReason.LENGTH, 1, 1)

    async def finish(self, request_id, index): ...


async def test_frames_become_image_slots_with_their_own_rows_and_hashes(smollm2_tokenizer):
    image = EncodedItem(torch.zeros(5, 2), "img", "mm://sha256:img", 1)
    frames = [EncodedItem(torch.full((4, 2), float(k)), f"frame{k}", "mm://sha256:file", 1,
                          frame=k) for k in (1, 2, 3)]
    engine = RecordingEngine()
    encoder = FakeEncoder([[image], frames])
    generator = Generator(engine, smollm2_tokenizer, load_family("smollm2", smollm2_tokenizer),
                          encoder)
    video = MediaItem(MediaRef(url="file:///v.mp4"), Modality.VIDEO, num_frames=3)
    message = Message("user", (MediaItem(MediaRef(url="data:x")), TextPart("a"), video))
    chunks = [c async for c in generator.generate(GenerateInput("r", messages=[message]))]
    assert encoder.asked[1] is video  # the encoder samples it; the LLM does not split rows
    (request,) = engine.requests
    assert [s.content_hash for s in request.spans] == ["img", "frame1", "frame2", "frame3"]
    assert [s.length for s in request.spans] == [5, 4, 4, 4]
    assert torch.equal(request.spans[2].embeddings, frames[1].embeddings)
    # One handle per media part: the video file's, which all its frames name.
    assert chunks[0].media_handles == ("mm://sha256:img", "mm://sha256:file")


def test_video_parts_from_pb():
    frames = llm_pb2.Video(frames=[common_pb2.MediaRef(url=f"data:{i}") for i in range(2)])
    file = llm_pb2.Video(file=common_pb2.MediaRef(url="file:///v.mp4"), num_frames=8)
    (msg,) = messages_from_pb([llm_pb2.ChatMessage(role="user", content=[
        llm_pb2.ContentPart(video=frames), llm_pb2.ContentPart(video=file)])])
    a, c = msg.media
    assert a.modality == Modality.VIDEO and [f.url for f in a.frames] == ["data:0", "data:1"]
    assert c.modality == Modality.VIDEO and c.num_frames == 8 and c.ref.url == "file:///v.mp4"
