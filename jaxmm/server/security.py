"""Two ASGI middlewares in front of every endpoint: an API key check and a request body cap.

Both are plain ASGI (not Starlette's BaseHTTPMiddleware) so they neither buffer responses
nor get in the way of streaming and of noticing a client that went away.
"""

from __future__ import annotations

import hmac

from jaxmm.server.errors import APIError

# endpoints a load balancer or a Prometheus scraper reaches without a key
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/ping"})


async def _send_error(send, err: APIError, extra_headers: list | None = None) -> None:
    resp = err.response()
    if extra_headers:
        resp.raw_headers.extend(extra_headers)
    await resp({"type": "http"}, None, send)


class APIKeyMiddleware:
    """`Authorization: Bearer KEY` on every path except OPEN_PATHS; 401 otherwise.

    Keys are compared in constant time (`hmac.compare_digest`) against each accepted key.
    """

    def __init__(self, app, api_keys: list[str]):
        self.app = app
        self.keys = [k.encode() for k in api_keys if k]

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        value = b""
        for name, v in headers:
            if name.lower() == b"authorization":
                value = v
                break
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        ok = False
        for key in self.keys:  # no early exit: the time does not tell which key matched
            ok |= hmac.compare_digest(token, key)
        return ok

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] != "http"
            or not self.keys
            or scope.get("method") == "OPTIONS"
            or scope["path"] in OPEN_PATHS
            or self._authorized(scope.get("headers", []))
        ):
            return await self.app(scope, receive, send)
        await _send_error(
            send,
            APIError(401, "invalid or missing API key", code="invalid_api_key"),
            [(b"www-authenticate", b"Bearer")],
        )


class BodySizeLimitMiddleware:
    """Refuse a request body over `max_bytes` with 413, before the app reads any of it.

    A declared Content-Length over the cap is refused at once; a chunked body is read up to
    the cap and then refused. Bodies under the cap are buffered and replayed to the app.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"the request body is larger than the {self.max_bytes} bytes this server accepts",
            code="request_too_large",
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _send_error(send, APIError(400, "bad Content-Length header"))
                if declared > self.max_bytes:
                    return await _send_error(send, self._too_large(), [(b"connection", b"close")])
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await _send_error(send, self._too_large(), [(b"connection", b"close")])
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive():
            if replay:
                return replay.pop()
            return await receive()  # then: http.disconnect when the client goes away

        await self.app(scope, replay_receive, send)
