from __future__ import annotations

import grpc
import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from gateway.errors import APIError, from_grpc, from_validation
from gateway.protocol import ChatCompletionRequest

S = grpc.StatusCode


@pytest.mark.parametrize(("code", "status", "type_", "error_code"), [
    (S.INVALID_ARGUMENT, 400, "invalid_request_error", None),
    (S.NOT_FOUND, 404, "invalid_request_error", "not_found"),
    (S.UNAUTHENTICATED, 401, "invalid_request_error", "invalid_api_key"),
    (S.PERMISSION_DENIED, 403, "invalid_request_error", "permission_denied"),
    (S.RESOURCE_EXHAUSTED, 429, "rate_limit_error", "rate_limit_exceeded"),
])
def test_client_errors_keep_the_services_message(code, status, type_, error_code) -> None:
    error = from_grpc(code, "image 2 is larger than 20 MiB")
    assert error.status == status
    assert error.body() == {"error": {"message": "image 2 is larger than 20 MiB", "type": type_,
                                      "param": None, "code": error_code}}


@pytest.mark.parametrize(("code", "status", "message"), [
    (S.UNAVAILABLE, 503, "The model service is unavailable; retry later."),
    (S.DEADLINE_EXCEEDED, 504, "The request timed out."),
    (S.INTERNAL, 500, "Internal server error."),
    (S.UNKNOWN, 500, "Internal server error."),
    (S.DATA_LOSS, 500, "Internal server error."),
    (S.CANCELLED, 500, "Internal server error."),
])
def test_server_errors_hide_internals(code, status, message) -> None:
    error = from_grpc(code, "Traceback (most recent call last): ipv4:10.0.0.7:50051")
    assert error.status == status
    assert error.message == message
    assert error.type == "server_error"
    assert "10.0.0.7" not in str(error.body())


def test_resource_exhausted_sets_retry_after() -> None:
    assert from_grpc(S.RESOURCE_EXHAUSTED, "queue full").headers == {"Retry-After": "1"}
    hinted = from_grpc(S.RESOURCE_EXHAUSTED, "queue full", (("retry-after", "7"),))
    assert hinted.headers == {"Retry-After": "7"}
    assert hinted.response().headers["retry-after"] == "7"
    assert from_grpc(S.INVALID_ARGUMENT, "bad").headers == {}


def test_api_error_response_is_the_openai_error_body() -> None:
    response = APIError(413, "too big", param="messages", code="request_too_large").response()
    assert response.status_code == 413
    assert response.body == (b'{"error":{"message":"too big","type":"invalid_request_error",'
                             b'"param":"messages","code":"request_too_large"}}')


def validation_error(payload: dict) -> RequestValidationError:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(payload)
    # FastAPI reports body fields under a leading "body".
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()])


def test_validation_error_names_the_field() -> None:
    error = from_validation(validation_error({"messages": [{"role": "user", "content": 5}]}))
    assert error.status == 400
    assert error.param == "messages.0.content"
    assert error.message == ("messages.0.content: content must be a string or an array of "
                             "content parts")


def test_validation_error_of_a_nested_part() -> None:
    payload = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {}}]}]}
    error = from_validation(validation_error(payload))
    assert error.param == "messages.0.content.1.image_url.url"
    assert error.message == "messages.0.content.1.image_url.url: Field required"


def test_validation_error_lists_a_few_problems() -> None:
    error = from_validation(validation_error({"messages": [], "temperature": 9, "n": 0}))
    assert error.param == "temperature"  # the first, in field order
    assert "messages: List should have at least 1 item after validation" in error.message
    assert "temperature: Input should be less than or equal to 2" in error.message
    assert "n: Input should be greater than or equal to 1" in error.message


def test_invalid_json_has_no_param() -> None:
    exc = RequestValidationError([{"type": "json_invalid", "loc": ("body", 12),
                                   "msg": "JSON decode error", "input": {},
                                   "ctx": {"error": "Expecting ',' delimiter"}}])
    error = from_validation(exc)
    assert error.param is None
    assert error.message == "the request body is not valid JSON (Expecting ',' delimiter)"


def test_missing_body() -> None:
    exc = RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required",
                                   "input": None}])
    assert from_validation(exc).message == "a JSON request body is required"
