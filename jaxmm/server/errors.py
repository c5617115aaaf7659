"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

The body has OpenAI's documented shape on every path (a route's error, a validation error,
an unknown route, an error event inside a stream): `message` and `type` are strings,
`param` and `code` are a string or null. `code` is a machine-readable reason where there is
one (`model_not_found`, `invalid_api_key`, `context_length_exceeded`, ...), never the HTTP
status, which the response carries already.

Every failure a client can cause maps to a 4xx with a message that says what to fix; an
unexpected one is a 500 whose message names no internals (the traceback goes to the log).
"""

from __future__ import annotations

import functools
import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger("jaxmm.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        if code is not None and not isinstance(code, str):
            raise TypeError(f"an error code is a string or None, got {code!r}")
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def sse(self) -> str:
        """The error as one server-sent event (a failure after a stream started)."""
        return f"data: {json.dumps(self.body())}\n\n"


_PARAM = re.compile(r"^SamplingParams\.(\w+) ")


def from_exception(e: BaseException) -> APIError:
    """Map an exception from input handling or the engine to the APIError a client sees."""
    from jaxmm.engine.async_engine import EngineDeadError, EngineError
    from jaxmm.multimodal.fetch import MediaError

    if isinstance(e, APIError):
        return e
    if isinstance(e, MediaError):
        # 403 (refused by policy) is a bad request as far as the client is concerned
        return APIError(413 if e.status == 413 else 400, str(e), param="messages")
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e))
    if isinstance(e, EngineError):
        return APIError(500, str(e))
    if isinstance(e, ImportError):
        # an optional front end (multimodal inputs, Whisper) that this build does not have
        logger.warning("feature unavailable: %s", e)
        return APIError(501, "this feature is not available in this build of jaxmm")
    if _is_template_error(e):
        return APIError(400, f"the chat template failed: {e}", param="messages")
    if isinstance(e, (ValueError, TypeError)):
        msg = str(e)
        m = _PARAM.match(msg)
        if m:
            return APIError(400, msg.replace("SamplingParams.", "", 1), param=m.group(1))
        return APIError(400, msg)
    logger.error("unexpected error", exc_info=e)
    return APIError(500, "internal server error")


def _is_template_error(e: BaseException) -> bool:
    try:
        from jinja2 import TemplateError
    except ImportError:
        return False
    return isinstance(e, TemplateError)


def api_errors(endpoint):
    """Decorate an endpoint so any exception becomes its OpenAI-style error response (the
    traceback of an unexpected one is logged, never sent)."""

    @functools.wraps(endpoint)
    async def wrapper(request: Request):
        try:
            return await endpoint(request)
        except Exception as e:
            return from_exception(e).response()

    return wrapper


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = f"{loc}: {first.get('msg', 'invalid request')}" if loc else "invalid request"
        return APIError(400, msg, param=loc or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()
