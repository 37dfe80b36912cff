from __future__ import annotations

import grpc
import pytest

from llm_service import errors
from llm_service.engine.protocol import FinishReason, StructuredOutput
from llm_service.generator import Chunk, Usage
from llm_service.server import chunk_to_pb, grpc_status, messages_from_pb, sampling_from_pb
from protos import common_pb2, llm_pb2


@pytest.mark.parametrize("exc, code", [
    (errors.InvalidRequest("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
    (errors.PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
    (errors.Overloaded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
    (errors.EngineDead("x"), grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.ServiceError("x"), grpc.StatusCode.INTERNAL),
    (RuntimeError("x"), grpc.StatusCode.INTERNAL),
])
def test_error_to_status(exc, code):
    assert grpc_status(exc) == code


def test_sampling_defaults_and_fields():
    params, stop, skip = sampling_from_pb(llm_pb2.SamplingParams())
    assert (params.max_tokens, params.temperature, params.top_p, params.n) == (256, 1.0, 1.0, 1)
    assert params.seed is None and params.logprobs is None and stop == () and skip is True
    pb = llm_pb2.SamplingParams(max_tokens=7, temperature=0.0, seed=3, stop=["a", "bc"],
                                logprobs=2, n=2, skip_special_tokens=False, top_k=5)
    params, stop, skip = sampling_from_pb(pb)
    assert (params.max_tokens, params.greedy, params.seed, params.logprobs, params.n,
            params.top_k) == (7, True, 3, 2, 2, 5)
    assert stop == ("a", "bc") and skip is False


@pytest.mark.parametrize("pb, field", [
    (llm_pb2.SamplingParams(temperature=-1.0), "temperature"),
    (llm_pb2.SamplingParams(top_p=1.5), "top_p"),
    (llm_pb2.SamplingParams(max_tokens=0), "max_tokens"),
    (llm_pb2.SamplingParams(presence_penalty=3.0), "presence_penalty"),
    (llm_pb2.SamplingParams(stop=[""]), "stop"),
])
def test_bad_sampling_is_invalid_request_naming_the_field(pb, field):
    with pytest.raises(errors.InvalidRequest, match=field):
        sampling_from_pb(pb)


def test_messages_from_pb_maps_roles_and_parts():
    msgs = messages_from_pb([
        llm_pb2.ChatMessage(role="developer", content=[llm_pb2.ContentPart(text="be nice")]),
        llm_pb2.ChatMessage(role="user", content=[
            llm_pb2.ContentPart(image=common_pb2.MediaRef(url="data:image/png;base64,AA")),
            llm_pb2.ContentPart(audio=common_pb2.MediaRef(data=b"RIFF")),
            llm_pb2.ContentPart(text="hi"),
        ]),
    ])
    assert msgs[0].role == "system" and msgs[0].text == "be nice"
    image, audio = msgs[1].media
    assert image.ref.url.startswith("data:") and audio.ref.data == b"RIFF"
    assert msgs[1].text == "hi"


def test_media_part_without_source_is_rejected():
    with pytest.raises(errors.InvalidRequest, match="neither a url nor data"):
        messages_from_pb([llm_pb2.ChatMessage(role="user", content=[
            llm_pb2.ContentPart(image=common_pb2.MediaRef())])])


def test_chunk_to_pb_carries_usage_and_finish():
    pb = chunk_to_pb(Chunk(1, "Paris", [42], FinishReason.STOP, Usage(10, 3, 2)))
    assert (pb.index, pb.text, list(pb.token_ids)) == (1, "Paris", [42])
    assert pb.finish_reason == llm_pb2.FINISH_REASON_STOP
    assert (pb.usage.prompt_tokens, pb.usage.completion_tokens, pb.usage.cached_tokens) == (10, 3, 2)


def test_logit_bias_and_structured_reach_the_engine_params():
    pb = llm_pb2.SamplingParams(logit_bias={7: 5.0, 3: -100.0},
                                structured=llm_pb2.StructuredOutput(regex="[a-z]+"))
    params, _, _ = sampling_from_pb(pb)
    assert params.logit_bias == ((3, -100.0), (7, 5.0))
    assert params.structured == StructuredOutput("regex", spec="[a-z]+")
    choice = llm_pb2.StructuredOutput(choice=llm_pb2.ChoiceList(choices=["yes", "no"]))
    params, _, _ = sampling_from_pb(llm_pb2.SamplingParams(structured=choice))
    assert params.structured == StructuredOutput("choice", choices=("yes", "no"))
    params, _, _ = sampling_from_pb(llm_pb2.SamplingParams(
        structured=llm_pb2.StructuredOutput(json_object=True)))
    assert params.structured == StructuredOutput("json_object")
    params, _, _ = sampling_from_pb(llm_pb2.SamplingParams())
    assert params.structured is None and params.logit_bias == ()


@pytest.mark.parametrize("pb, field", [
    (llm_pb2.SamplingParams(logit_bias={i: 1.0 for i in range(301)}), "logit_bias has 301"),
    (llm_pb2.SamplingParams(logit_bias={5: 101.0}), "logit_bias: the bias of token 5"),
    (llm_pb2.SamplingParams(structured=llm_pb2.StructuredOutput(regex="")),
     "sampling.structured.regex"),
    (llm_pb2.SamplingParams(structured=llm_pb2.StructuredOutput(
        choice=llm_pb2.ChoiceList())), "sampling.structured.choice"),
])
def test_bad_logit_bias_or_structured_is_invalid_naming_the_field(pb, field):
    with pytest.raises(errors.InvalidRequest, match=field) as caught:
        sampling_from_pb(pb)
    assert grpc_status(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
