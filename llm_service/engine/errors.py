"""Engine errors: what an engine raises to its caller. The message is shown to the client.

The engine package imports nothing of the service around it; the service's error module
builds on these classes and maps the whole hierarchy to gRPC status codes once.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class; the message is shown to the client."""


class InvalidRequest(EngineError):
    """Bad input: the caller must change the request."""


class Overloaded(EngineError):
    """The waiting queue is full; retry later."""


class Unavailable(EngineError):
    """The engine (or a dependency) cannot serve right now."""


class EngineDead(Unavailable):
    """A fatal engine error; the service reports itself unhealthy."""
