"""Refuses request bodies over a byte budget with 413 before any parsing (pure ASGI, memory bounded by it), and a
Content-Length that is not a number with 400."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import error_body


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not declared.isdigit():  # malformed, not large: the client's framing is wrong
            await _refuse(send, 400, "bad_request",
                          f"Content-Length {declared.decode(errors='replace')!r} is not a non-negative integer")
            return
        if declared is not None and int(declared) > self.max_bytes:
            await self._too_large(send, f"declared Content-Length {declared.decode()!r}")
            return
        chunks, size, more = [], 0, True
        while more:  # read (and bound) the whole body here, then replay it to the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody left to answer; MetricsMiddleware counts it as 499
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send, f"body of more than {size} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send, what: str) -> None:
        await _refuse(send, 413, "payload_too_large", f"{what} exceeds the limit of {self.max_bytes} bytes")


async def _refuse(send: Send, status: int, code: str, detail: str) -> None:
    """The project's error body, sent before the app (and its exception handlers) sees the request."""
    payload = json.dumps(error_body(code, detail)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
