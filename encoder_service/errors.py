"""Encoder service errors; `status_code` maps them to gRPC once, at the edge (server.py).

The message of every error is shown to the client, so it says what to change.
"""

from __future__ import annotations

import grpc


class EncoderError(Exception):
    """Base class for errors the client is told about."""


class InvalidRequest(EncoderError):
    """The request itself is malformed or over a limit."""


class InvalidMedia(InvalidRequest):
    """A media item cannot be used: bad encoding, not an image, over a limit, fetch failed."""


class MediaNotFound(EncoderError):
    """An `mm://sha256:<hex>` handle (or a local file) that this service does not have."""


class MediaForbidden(EncoderError):
    """A source this deployment does not allow: blocked address, domain or local path."""


class Unavailable(EncoderError):
    """The service cannot encode right now (tower not loaded, shutting down)."""


_STATUS = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    MediaNotFound: grpc.StatusCode.NOT_FOUND,
    MediaForbidden: grpc.StatusCode.PERMISSION_DENIED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_code(error: EncoderError) -> grpc.StatusCode:
    """The gRPC status for an encoder error; anything unlisted is a bug (INTERNAL)."""
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.INTERNAL
