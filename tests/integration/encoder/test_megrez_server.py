"""The real grpc.aio encoder server with the Megrez family: images and audio on one stream."""

from __future__ import annotations

import base64
import io
import json

import grpc
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from encoder_service.config import EncoderConfig
from encoder_service.server import EncoderServer
from mmserve.wire.chunks import chunks_to_tensor
from hf_layouts import make_rand, megrez_tower_state, wav_bytes
from protos import common_pb2, encoder_pb2, encoder_pb2_grpc

HIDDEN = 256
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              image_size=980, patch_size=14)
AUDIO = dict(n_mels=128, n_ctx=1500, n_state=32, n_head=4, n_layer=1, output_dim=HIDDEN)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random weights in the reference layout (audio under OpenAI Whisper names)."""
    state = megrez_tower_state(make_rand(0), VISION, HIDDEN, AUDIO)
    path = tmp_path_factory.mktemp("megrez")
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(
        {"hidden_size": HIDDEN, "query_num": 64, "vision_config": VISION, "audio_config": AUDIO}))
    return path


@pytest.fixture
async def channel(checkpoint):
    config = EncoderConfig(host="127.0.0.1", port=0, family="megrez-omni", tower="torch",
                           checkpoint=str(checkpoint), max_audio_seconds=5)
    server = EncoderServer(config)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel
    await server.stop(grace=0)


def wav(seconds: float) -> bytes:
    return wav_bytes(seconds, rate=22050)  # not 16 kHz: the encoder resamples


def png_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 140, 200)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def audio_item(**ref) -> encoder_pb2.MediaItem:
    return encoder_pb2.MediaItem(modality=common_pb2.MODALITY_AUDIO,
                                 ref=common_pb2.MediaRef(**ref))


async def encode(channel, *items):
    stub = encoder_pb2_grpc.EncoderStub(channel)
    headers, chunks = {}, {}
    async for response in stub.Encode(encoder_pb2.EncodeRequest(items=items)):
        if response.HasField("header"):
            headers[response.item_index], chunks[response.item_index] = response.header, []
        else:
            chunks[response.item_index].append(response.chunk)
    return [(headers[i], chunks_to_tensor(headers[i], chunks[i])) for i in sorted(headers)]


async def test_image_and_audio_items_encode_with_their_row_counts(channel):
    image = encoder_pb2.MediaItem(modality=common_pb2.MODALITY_IMAGE,
                                  ref=common_pb2.MediaRef(url=png_url(1000, 600)))
    data_url = "data:audio/wav;base64," + base64.b64encode(wav(1.0)).decode()
    results = await encode(channel, image, audio_item(data=wav(2.5), mime_type="audio/wav"),
                           audio_item(url=data_url))
    (image_header, image_rows), (long_header, long_rows), (short_header, short_rows) = results
    assert (image_header.num_tokens, image_header.num_tiles) == (192, 3)
    # 2.5 s -> 250 mel frames -> 125 after the convs -> 62 rows + bos/eos.
    assert (long_header.num_tokens, long_header.num_tiles) == (64, 1)
    assert (short_header.num_tokens, short_header.num_tiles) == (27, 1)
    assert image_rows.shape == (192, HIDDEN) and short_rows.shape == (27, HIDDEN)
    assert torch.isfinite(long_rows).all() and len(short_header.content_hash) == 64
    assert short_header.content_hash != long_header.content_hash


async def test_model_info_lists_audio(channel):
    info = await encoder_pb2_grpc.EncoderStub(channel).GetModelInfo(
        encoder_pb2.EncoderInfoRequest())
    assert list(info.modalities) == [common_pb2.MODALITY_IMAGE, common_pb2.MODALITY_AUDIO]
    assert (info.family, info.tokens_per_tile, info.hidden_size) == ("megrez-omni", 64, HIDDEN)


@pytest.mark.parametrize(("item", "message"), [
    (audio_item(data=wav(6.0)), "limit of 5 s"),
    (audio_item(url="data:image/png;base64,AAAA"), "audio items need type audio/*"),
    (audio_item(data=b"not audio at all" * 10), "not decodable audio"),
])
async def test_bad_audio_is_invalid_argument(channel, item, message):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await encode(channel, item)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


async def test_an_audio_handle_stands_in_for_the_audio(channel):
    (header, rows), = await encode(channel, audio_item(data=wav(1.0), mime_type="audio/wav"))
    handle = header.handle
    (again, again_rows), = await encode(channel, audio_item(url=handle))
    assert (again.content_hash, again.num_tokens) == (header.content_hash, 27)
    torch.testing.assert_close(again_rows, rows, rtol=0, atol=0)
    for item, code, message in [
        (encoder_pb2.MediaItem(modality=common_pb2.MODALITY_IMAGE,
                               ref=common_pb2.MediaRef(url=handle)),
         grpc.StatusCode.INVALID_ARGUMENT, "names an audio, but it was sent as an image"),
        (audio_item(url="mm://sha256:" + "0" * 64), grpc.StatusCode.NOT_FOUND,
         "send the audio itself again"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await encode(channel, item)
        assert error.value.code() == code and message in error.value.details()
