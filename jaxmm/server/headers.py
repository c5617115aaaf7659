"""A cap on request headers: 431 Request Header Fields Too Large.

uvicorn's C parser (httptools) takes headers of any size, so a client could send megabytes
of them with every request. This plain-ASGI middleware, outermost in the app, answers 431
before any other work when the headers are over `max_bytes` in all (names + values) or more
than `max_count` fields. The defaults follow common servers: 32 KiB (nginx's 4 x 8 KiB
buffers) and 100 fields (Apache's LimitRequestFields).
"""

from __future__ import annotations

from jaxmm.server.errors import APIError

DEFAULT_MAX_HEADER_BYTES = 32 * 1024
DEFAULT_MAX_HEADER_COUNT = 100


class HeaderLimitMiddleware:
    def __init__(
        self,
        app,
        max_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_count: int = DEFAULT_MAX_HEADER_COUNT,
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.max_count = max_count

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = scope.get("headers") or []
            size = sum(len(k) + len(v) for k, v in headers)
            if len(headers) > self.max_count or size > self.max_bytes:
                err = APIError(
                    431,
                    f"request headers too large: {len(headers)} fields, {size} bytes (at most "
                    f"{self.max_count} fields, {self.max_bytes} bytes)",
                    type="invalid_request_error",
                )
                # the client may still be sending: close rather than read on
                resp = err.response()
                resp.raw_headers.append((b"connection", b"close"))
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)
