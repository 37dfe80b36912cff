from __future__ import annotations

import base64

import pytest

from gateway.errors import APIError
from gateway.llm_client import chat_request_to_pb, completion_request_to_pb
from gateway.protocol import ChatCompletionRequest, CompletionRequest

WAV = b"RIFF\x24\x00\x00\x00WAVEfmt "


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], **fields})


def test_messages_become_typed_parts() -> None:
    request = chat(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": "You see images."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is in"},
            {"type": "image_url", "image_url": {"url": "https://img.example/cat.jpg"}},
            {"type": "input_audio",
             "input_audio": {"data": base64.b64encode(WAV).decode(), "format": "wav"}},
            {"type": "input_audio", "input_audio": {"data": "SUQz", "format": "mp3"}},
        ]},
        {"role": "assistant", "content": "A cat."},
    ])
    pb = chat_request_to_pb(request, "chatcmpl-abc", "internvl2-1b")
    assert (pb.request_id, pb.model, pb.WhichOneof("input")) == (
        "chatcmpl-abc", "internvl2-1b", "messages")
    messages = pb.messages.messages
    # Roles go as sent: the LLM service maps "developer" to system, once, for every caller
    # (tests/unit/llm/test_server_mapping.py).
    assert [m.role for m in messages] == ["developer", "system", "user", "assistant"]
    text, image, wav, mp3 = messages[2].content
    assert text.text == "What is in"
    assert image.image.url == "https://img.example/cat.jpg"
    assert (wav.audio.data, wav.audio.mime_type) == (WAV, "audio/wav")
    assert (mp3.audio.data, mp3.audio.mime_type) == (b"ID3", "audio/mpeg")
    assert messages[3].content[0].text == "A cat."


def test_line_wrapped_base64_is_accepted() -> None:
    data = base64.encodebytes(WAV * 10).decode()  # wrapped at 76 characters
    assert "\n" in data
    request = chat(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]}])
    assert chat_request_to_pb(request, "r", "m").messages.messages[0].content[0].audio.data == (
        WAV * 10)


@pytest.mark.parametrize("data", ["not base64!", "QUJ", "data:audio/wav;base64,UklGRg=="])
def test_invalid_base64_is_a_400_naming_the_field(data: str) -> None:
    request = chat(messages=[{"role": "system", "content": "x"}, {"role": "user", "content": [
        {"type": "text", "text": "listen"},
        {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]}])
    with pytest.raises(APIError) as info:
        chat_request_to_pb(request, "r", "m")
    assert info.value.status == 400
    assert info.value.param == "messages.1.content.1.input_audio.data"
    assert info.value.message == "messages.1.content.1.input_audio.data is not valid base64"


def test_sampling_fields_are_forwarded() -> None:
    request = chat(max_tokens=100, max_completion_tokens=32, temperature=0.7, top_p=0.9, top_k=40,
                   min_p=0.05, seed=1234, stop=["\n\n", "END"], stop_token_ids=[2],
                   presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.1,
                   min_tokens=3, ignore_eos=True, n=3, logprobs=True, top_logprobs=5,
                   skip_special_tokens=False)
    s = chat_request_to_pb(request, "r", "m").sampling
    assert s.max_tokens == 32  # max_completion_tokens wins
    assert (s.temperature, s.top_p, s.min_p) == pytest.approx((0.7, 0.9, 0.05))
    assert (s.top_k, s.seed, list(s.stop), list(s.stop_token_ids)) == (40, 1234, ["\n\n", "END"],
                                                                       [2])
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == pytest.approx(
        (0.5, -0.5, 1.1))
    assert (s.min_tokens, s.ignore_eos, s.n, s.logprobs, s.skip_special_tokens) == (
        3, True, 3, 5, False)


def test_unset_sampling_fields_stay_unset() -> None:
    s = chat_request_to_pb(chat(top_k=-1), "r", "m").sampling
    for field in ("max_tokens", "temperature", "top_p", "seed", "repetition_penalty", "logprobs"):
        assert not s.HasField(field), field
    assert s.top_k == 0  # vLLM's -1 means disabled, like the proto's 0
    assert (s.n, s.skip_special_tokens, list(s.stop)) == (1, True, [])


def test_greedy_temperature_zero_is_sent_explicitly() -> None:
    s = chat_request_to_pb(chat(temperature=0), "r", "m").sampling
    assert s.HasField("temperature") and s.temperature == 0


def test_completion_prompt_string_and_token_ids() -> None:
    text = completion_request_to_pb(CompletionRequest(prompt="Once upon", max_tokens=8, logprobs=2),
                                    "cmpl-1", "m")
    assert (text.WhichOneof("input"), text.prompt) == ("prompt", "Once upon")
    assert (text.sampling.max_tokens, text.sampling.logprobs) == (8, 2)
    ids = completion_request_to_pb(CompletionRequest(prompt=[1, 2, 70000]), "cmpl-2", "m")
    assert (ids.WhichOneof("input"), list(ids.prompt_token_ids.ids)) == (
        "prompt_token_ids", [1, 2, 70000])
    assert not ids.sampling.HasField("logprobs")


def test_video_frames_and_video_url_parts() -> None:
    request = chat(messages=[{"role": "user", "content": [
        {"type": "video", "video": ["data:image/png;base64,AA", "data:image/png;base64,AB"]},
        {"type": "video_url", "video_url": {"url": "file:///clips/a.mp4", "num_frames": 8}},
        {"type": "text", "text": "What happens?"}]}])
    frames, file, text = chat_request_to_pb(request, "r", "m").messages.messages[0].content
    assert [f.url for f in frames.video.frames] == ["data:image/png;base64,AA",
                                                   "data:image/png;base64,AB"]
    assert (file.video.file.url, file.video.num_frames) == ("file:///clips/a.mp4", 8)
    assert text.text == "What happens?"


def test_video_part_without_payload_is_rejected() -> None:
    with pytest.raises(ValueError, match="'video'"):
        chat(messages=[{"role": "user", "content": [{"type": "video"}]}])
