"""API keys: `Authorization: Bearer <key>` on everything but the probes and metrics."""

from __future__ import annotations

import hashlib
import hmac

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import APIError

# Kubelet probes and Prometheus scrapers carry no API key; neither does a browser
# loading the chat page, which then sends the key the user typed with each API call.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/"})
OPEN_PREFIXES = ("/web/",)
TENANT_STATE = "tenant"


class ApiKeyMiddleware:
    """Rejects requests without a valid key with 401 before their body is read.

    Everything not explicitly open is protected, so a new route cannot be left
    open by accident.
    """

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]) -> None:
        self.app = app
        self._keys = [key.encode() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not self._keys or scope["path"] in OPEN_PATHS
                or scope["path"].startswith(OPEN_PREFIXES)):
            await self.app(scope, receive, send)
            return
        key = self._authorized(Headers(scope=scope).get("authorization", ""))
        if key is not None:
            scope.setdefault("state", {})[TENANT_STATE] = tenant_id(key)
            await self.app(scope, receive, send)
            return
        error = APIError(401, "Missing or incorrect API key: send `Authorization: Bearer <key>`.",
                         code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)

    def _authorized(self, authorization: str) -> bytes | None:
        """The configured key presented, or None."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        presented = token.strip().encode()
        # Every key is compared, so the time taken does not tell which one came close.
        matches = [hmac.compare_digest(presented, key) for key in self._keys]
        return self._keys[matches.index(True)] if any(matches) else None


def tenant_id(key: bytes) -> str:
    """The tenant the encoder scopes media handles to: a hash of the API key (never the key),
    so a handle uploaded with one key does not resolve with another."""
    return hashlib.sha256(b"mmserve-tenant;" + key).hexdigest()[:32]


def tenant_of(request: Request) -> str:
    """The request's tenant; "" without API keys (one shared tenant)."""
    return str(getattr(request.state, TENANT_STATE, ""))
