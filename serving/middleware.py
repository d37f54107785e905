"""Plain ASGI middlewares: the API key check, the request body size limit, and error counting.

    ApiKeyAuth   /v1/*, /tokenize and /detokenize need `Authorization: Bearer KEY` (constant-time compare),
                 else 401 invalid_api_key; /health and /metrics stay open.
    BodyLimit    a body over `max_bytes` (by Content-Length, or counted while reading a chunked body) is
                 answered 413 request_too_large before the app sees it; smaller bodies are buffered and
                 replayed to the app, then `receive` passes through (so disconnects are still seen).
    StatusCounter  calls `count(status)` for every response with status >= 400 (outermost, so it sees all),
                 and `active(+1)` / `active(-1)` around every HTTP request (the drain waits for them).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from serving.errors import error_body

Scope = dict[str, Any]
PROTECTED = ("/tokenize", "/detokenize")  # besides /v1/*


async def _send_error(send: Any, status: int, message: str, code: str, headers: list | None = None) -> None:
    body = json.dumps(error_body(status, message, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v
    return None


class ApiKeyAuth:
    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (scope["path"].startswith("/v1/") or scope["path"] in PROTECTED):
            got = _header(scope, b"authorization") or b""
            if not hmac.compare_digest(got, self.expected):
                await _send_error(send, 401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                  "invalid_api_key", [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, send: Any) -> Any:
        return _send_error(send, 413, f"The request body is larger than {self.max_bytes} bytes.", "request_too_large")

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(send)
            return
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # disconnected while sending the body
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(send)
                return
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class StatusCounter:
    def __init__(self, app: Any, count: Callable[[int], None], active: Callable[[int], None]) -> None:
        self.app = app
        self.count = count
        self.active = active

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def watch(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start" and msg["status"] >= 400:
                self.count(msg["status"])
            await send(msg)

        self.active(1)
        try:
            await self.app(scope, receive, watch)
        finally:
            self.active(-1)
