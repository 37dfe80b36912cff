"""Encoder service errors; `STATUS` maps them to gRPC once, at the edge (server.py).

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


class Overloaded(EncoderError):
    """Too much work in flight right now (decoded-pixel budget spent); retry shortly."""


class Unavailable(EncoderError):
    """The service cannot encode right now (tower not loaded, shutting down)."""


STATUS: dict[type[BaseException], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    MediaNotFound: grpc.StatusCode.NOT_FOUND,
    MediaForbidden: grpc.StatusCode.PERMISSION_DENIED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}
