"""LLM service errors, mapped to gRPC status codes once, in server.py (`STATUS`).

The engine's errors (engine/errors.py) are part of this hierarchy, so the engine package
stays free of the service; the service adds what only it raises.
"""

from __future__ import annotations

import grpc

from llm_service.engine.errors import (
    EngineDead,
    EngineError,
    InvalidRequest,
    Overloaded,
    Unavailable,
)

ServiceError = EngineError  # every error whose message the client sees


class NotFound(ServiceError):
    """Unknown model or media handle."""


class PermissionDenied(ServiceError):
    """Media source outside what this deployment allows."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed."""


STATUS: dict[type[BaseException], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

__all__ = ["STATUS", "DeadlineExceeded", "EngineDead", "InvalidRequest", "NotFound",
           "Overloaded", "PermissionDenied", "ServiceError", "Unavailable"]
