"""Gateway errors, mapped once to HTTP status + OpenAI error JSON.

gRPC statuses from the LLM service, request validation failures, unknown
routes and bugs all leave through `install_handlers`, so every error a client
sees has the same `{"error": {message, type, param, code}}` body.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from gateway.protocol import ErrorDetail, ErrorResponse
from gateway.request_model import FieldError
from mmserve.wire.media import MEDIA_STORE_UNAVAILABLE

logger = logging.getLogger(__name__)

# nginx's "client closed request": recorded in metrics and logs, never seen by the client.
CLIENT_CLOSED_REQUEST = 499
DEFAULT_RETRY_AFTER_S = "1"


class APIError(Exception):
    """An error the client receives as an OpenAI error body with this HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready."""


class HttpError(NamedTuple):
    status: int
    type: str
    code: str | None
    # None passes the LLM service's message through: it tells the caller what to
    # change. Server-side failures get a fixed message so internals stay inside.
    public_message: str | None


GRPC_TO_HTTP: dict[grpc.StatusCode, HttpError] = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpError(400, "invalid_request_error", None, None),
    grpc.StatusCode.NOT_FOUND: HttpError(404, "invalid_request_error", "not_found", None),
    grpc.StatusCode.UNAUTHENTICATED: HttpError(401, "invalid_request_error", "invalid_api_key",
                                               None),
    grpc.StatusCode.PERMISSION_DENIED: HttpError(403, "invalid_request_error",
                                                 "permission_denied", None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpError(429, "rate_limit_error", "rate_limit_exceeded",
                                                  None),
    grpc.StatusCode.UNAVAILABLE: HttpError(503, "server_error", "service_unavailable",
                                           "The model service is unavailable; retry later."),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpError(504, "server_error", "timeout",
                                                 "The request timed out."),
}
INTERNAL_MESSAGE = "Internal server error."
INTERNAL = HttpError(500, "server_error", None, INTERNAL_MESSAGE)


def internal_error() -> APIError:
    return APIError(INTERNAL.status, INTERNAL_MESSAGE, type=INTERNAL.type)


def from_grpc(code: grpc.StatusCode, details: str | None,
              trailing_metadata: Sequence[tuple[str, Any]] = ()) -> APIError:
    """The APIError for a failed gRPC call to the LLM service."""
    mapped = GRPC_TO_HTTP.get(code, INTERNAL)
    if mapped.public_message is not None:
        logger.warning("LLM service call failed: %s: %s", code.name, details)
    headers = {}
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        # The LLM service may say when to come back; otherwise a short back-off.
        hint = dict(trailing_metadata or ()).get("retry-after", "")
        headers["Retry-After"] = hint if hint.isdigit() else DEFAULT_RETRY_AFTER_S
    public = mapped.public_message
    if code is grpc.StatusCode.UNAVAILABLE and (details or "").startswith(MEDIA_STORE_UNAVAILABLE):
        public = details  # says which media to send instead; names no host
    return APIError(mapped.status, public or details or code.name.lower(),
                    type=mapped.type, code=mapped.code, headers=headers)


def from_rpc_error(exc: grpc.aio.AioRpcError) -> APIError:
    return from_grpc(exc.code(), exc.details(), exc.trailing_metadata())


def _param(loc: Sequence[str | int]) -> str | None:
    path = list(loc[1:] if loc and loc[0] == "body" else loc)
    return ".".join(str(part) for part in path) or None


def _describe(error: Mapping[str, Any]) -> str:
    if error["type"] == "json_invalid":
        return f"the request body is not valid JSON ({error.get('ctx', {}).get('error', '')})"
    message = str(error["msg"]).removeprefix("Value error, ")
    param = _param(error["loc"])
    if error["type"] == "extra_forbidden":
        message = "not supported by this server; remove it (see the README's list of fields)"
    if param is None and error["type"] == "missing":
        return "a JSON request body is required"
    return f"{param}: {message}" if param else message


def from_validation(exc: RequestValidationError) -> APIError:
    """A 400 naming the first offending field, e.g. param "messages.0.content"."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    message = "; ".join(_describe(error) for error in errors[:3])
    if len(errors) > 3:
        message += f" (and {len(errors) - 3} more errors)"
    param = None if first["type"] == "json_invalid" else \
        first.get("ctx", {}).get("param") or _param(first["loc"])
    return APIError(400, message, param=param)


def install_handlers(app: FastAPI) -> None:
    """Route every failure through the one OpenAI error shape."""

    # Starlette types every handler as taking Exception; each is registered for one class.
    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return exc.response()

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return from_validation(exc).response()

    async def field_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, FieldError)
        return APIError(400, exc.message, param=exc.param).response()

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    async def rpc_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, grpc.aio.AioRpcError)
        return from_rpc_error(exc).response()

    async def client_gone(_: Request, __: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    async def bug(_: Request, __: Exception) -> Response:
        # Starlette re-raises after this response, so the traceback reaches the server log.
        return internal_error().response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(FieldError, field_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(grpc.aio.AioRpcError, rpc_error)
    app.add_exception_handler(ClientDisconnected, client_gone)
    app.add_exception_handler(Exception, bug)
