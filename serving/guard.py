"""ASGI middleware: API-key auth (except the health routes), the request body size limit, and JSON
bodies sent without a JSON content type.

Every POST route of the API takes a JSON body. ``curl -d '{"prompt": "..."}'`` without
``-H 'Content-Type: application/json'`` labels that body as a form
(``application/x-www-form-urlencoded``), and FastAPI would then refuse it with a message about
dictionaries. Such a body, or one with no content type, is read as JSON; when it is not JSON, the
answer says so (``invalid_json``).

The limits live in this module (one ingress per replica process) because ``serve.ingress``
freezes a copy of the FastAPI app at import time; ``Ingress.__init__`` calls :func:`configure`.
"""

from __future__ import annotations

import hmac
from typing import Any

from serving.errors import InvalidRequest, PayloadTooLarge, Unauthorized

# the health checks, and the static chat page (no model access: its API calls carry the key)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
_limits: dict[str, Any] = {"api_key": None, "max_body_bytes": 1_000_000}
# content types a JSON body arrives under when the client did not name one (curl -d's default)
UNLABELLED = (b"", b"application/x-www-form-urlencoded")


def as_json(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` with a missing or form content type replaced by ``application/json``."""
    ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
    if ctype.split(b";")[0].strip().lower() not in UNLABELLED:
        return headers
    return [(k, v) for k, v in headers if k.lower() != b"content-type"] + [(b"content-type", b"application/json")]


def configure(*, api_key: str | None, max_body_bytes: int) -> None:
    _limits.update(api_key=api_key, max_body_bytes=max_body_bytes)


class GuardMiddleware:
    """Reject unauthenticated requests (401) and bodies over the limit (413) before parsing; read an
    unlabelled POST body as JSON (:func:`as_json`)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        key = _limits["api_key"]
        if key and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {key}".encode()):
                return await Unauthorized().response()(scope, receive, send)
        limit = _limits["max_body_bytes"]
        too_big = PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            return await InvalidRequest("invalid Content-Length header").response()(scope, receive, send)
        if declared > limit:
            return await too_big.response()(scope, receive, send)
        if scope.get("method") == "POST":
            scope = {**scope, "headers": as_json(list(scope.get("headers") or []))}
        seen = 0

        async def limited_receive() -> dict:  # a chunked body without Content-Length
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_big
            return message

        await self.app(scope, limited_receive, send)
