"""LLM service errors, mapped to gRPC status codes once, in server.py."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class; the message is shown to the client."""


class InvalidRequest(ServiceError):
    """Bad input: the caller must change the request."""


class NotFound(ServiceError):
    """Unknown model or media handle."""


class PermissionDenied(ServiceError):
    """Media source outside what this deployment allows."""


class Overloaded(ServiceError):
    """The waiting queue is full; retry later."""


class Unavailable(ServiceError):
    """A dependency (encoder pool, engine) is down."""


class EngineDead(Unavailable):
    """A fatal engine error; the service reports itself unhealthy."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed."""
