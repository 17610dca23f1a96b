"""Request limits: 413 before an oversize body is read, whether or not it says its size;
422 for a URL holding a NUL character."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import InvalidRequest, PayloadTooLarge


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes`, or `upload_max_bytes` on paths ending in `:upload`."""

    def __init__(self, app: ASGIApp, max_bytes: int, upload_max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_max_bytes = upload_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            # PostgreSQL cannot store or compare text with NUL in it; refuse it up front.
            error = InvalidRequest("query", "the URL must not contain a NUL character")
            await error.response()(scope, receive, send)
            return
        is_upload = scope["path"].endswith(":upload")
        limit = self.upload_max_bytes if is_upload else self.max_bytes
        error = PayloadTooLarge(
            f"body: the {'upload' if is_upload else 'request body'} is larger than the limit "
            f"of {limit} bytes"
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await error.response({"Connection": "close"})(scope, receive, send)
            return

        received = 0
        started = refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > limit and not started:
                    # A body that did not declare its size: answer 413 now, and tell the app
                    # the client went away so it stops reading.
                    refused = True
                    await error.response({"Connection": "close"})(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:  # the 413 is already out; drop whatever the app answers after it
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, guarded_send)
