"""The ASGI middleware in front of every route: the API key, then the request-body size limit."""

from __future__ import annotations

import secrets
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from engram_serve.server import protocol as p
from engram_serve.server.errors import error_response


class RequestGuard:
    """Pure ASGI middleware: the API key on /v1 routes, then the body-size limit (the body is
    read here, at most `max_bytes` of it, and replayed to the app)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = self._auth_error(scope)
        messages: list[dict[str, Any]] = []
        if error is None:
            error = await self._read_body(scope, receive, messages)
        if error is not None:
            return await error_response(error)(scope, receive, send)

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def _auth_error(self, scope: Scope) -> p.APIError | None:
        if self.api_key is None or not scope["path"].startswith("/v1"):
            return None
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            return None
        return p.APIError(401, "invalid or missing API key (Authorization: Bearer <key>)")

    async def _read_body(
        self, scope: Scope, receive: Receive, messages: list[dict[str, Any]]
    ) -> p.APIError | None:
        too_large = p.APIError(413, f"the request body exceeds {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return p.APIError(400, "invalid Content-Length header")
            if int(length) > self.max_bytes:
                return too_large
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return too_large
            if message["type"] != "http.request" or not message.get("more_body", False):
                return None


__all__ = ["RequestGuard"]
