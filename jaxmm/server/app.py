"""The FastAPI app of `jaxmm serve`: routes, middlewares, shared state.

`build_app(client, ...)` takes any `EngineClient` (the real `AsyncEngine`, or one over a
fake core engine in tests) and returns the app; `serve(...)` runs it under uvicorn.

A request passes, outermost first: HTTP metrics -> API key (401) -> body cap (413) ->
route. Routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings,
/v1/audio/transcriptions (one module each), /health, /version, /metrics. A pooling
(embedding) model's client has no engine thread and its chat/completions routes answer 400.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from jaxmm.engine.async_engine import EngineClient
from jaxmm.server import chat, completions, embeddings, models, tokenize, transcriptions
from jaxmm.server.errors import APIError, install_handlers
from jaxmm.server.metrics import CONTENT_TYPE, HTTPMetricsMiddleware, ServerMetrics
from jaxmm.server.security import APIKeyMiddleware, BodySizeLimitMiddleware
from jaxmm.server.serving import ServerState

logger = logging.getLogger("jaxmm.server")

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


def build_app(
    client: EngineClient,
    *,
    served_model_names: list[str] | str,
    model_path: str | None = None,
    api_keys: list[str] | str | None = None,
    chat_template: str | None = None,
    trust_request_chat_template: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    pool_workers: int | None = None,
    shutdown_engine: bool = False,
) -> FastAPI:
    """The OpenAI-compatible app over `client`.

    `served_model_names`: the names requests may use in `model` (the first is the default
    when a request names none); `api_keys`: accepted bearer keys (none: no auth);
    `chat_template`: a Jinja template string overriding the tokenizer's;
    `shutdown_engine`: stop the engine when the app shuts down.
    """
    names = (
        [served_model_names] if isinstance(served_model_names, str) else list(served_model_names)
    )
    if not names:
        raise ValueError("served_model_names must not be empty")
    keys = [api_keys] if isinstance(api_keys, str) else list(api_keys or [])
    pool = ThreadPoolExecutor(
        max_workers=pool_workers or min(16, (os.cpu_count() or 1) + 4),
        thread_name_prefix="jaxmm-frontend",
    )
    metrics = ServerMetrics(client.get_stats)
    state = ServerState(
        client=client,
        served_model_names=names,
        model_path=model_path or names[0],
        metrics=metrics,
        pool=pool,
        chat_template=chat_template,
        trust_request_chat_template=trust_request_chat_template,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        pool.shutdown(wait=False, cancel_futures=True)
        if shutdown_engine:
            client.shutdown()

    app = FastAPI(title="jaxmm OpenAI-compatible server", lifespan=lifespan)
    app.state.jaxmm = state
    install_handlers(app)
    modules = (models, chat, completions, embeddings, transcriptions, tokenize)
    if getattr(client.engine, "supports_embeddings", False):
        # a pooling model: chat/completions answer 400 (mounted first, so matched first)
        app.include_router(embeddings.generation_refused)
    for module in modules:
        app.include_router(module.router)

    @app.get("/health")
    async def health(request: Request):
        if not client.is_running:
            return APIError(503, "the engine is not running").response()
        return Response(status_code=200)

    @app.get("/version")
    async def version(request: Request):
        from jaxmm import __version__

        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def prometheus(request: Request):
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    routes = frozenset(
        {"/health", "/version", "/metrics"} | {r.path for m in modules for r in m.router.routes}
    )
    # added innermost first: the last one added sees a request first
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(APIKeyMiddleware, api_keys=keys)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics, routes=routes)
    return app


def serve(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **uvicorn_kwargs,
) -> None:
    """Run `app` under uvicorn until interrupted; open streams get 5 s to finish on exit."""
    import uvicorn

    uvicorn_kwargs.setdefault("timeout_graceful_shutdown", 5)
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_kwargs)
