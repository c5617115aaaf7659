"""The FastAPI app of `jaxmm serve`: routes, middlewares, shared state.

`build_app(client, ...)` takes any `EngineClient` (the real `AsyncEngine`, or one over a
fake core engine in tests) and returns the app; `serve(...)` runs it under uvicorn.

A request passes, outermost first: CORS (when origins are allowed; it answers preflights)
-> root path (strips `--root-path` when the proxy kept it) -> HTTP metrics -> API key (401)
-> body cap (413) -> route. Routes: /v1/models, /v1/chat/completions, /v1/completions,
/v1/embeddings, /v1/audio/transcriptions (one module each), /health, /version, /metrics. A
pooling (embedding) model's client has no engine thread and its chat/completions routes answer 400.
With `log_stats`, a line of engine stats goes to the log every few seconds while it works.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from jaxmm.engine.async_engine import EngineClient
from jaxmm.server import chat, completions, embeddings, model_cards, tokenize, transcriptions
from jaxmm.server.chat_output import check_flags
from jaxmm.server.errors import APIError, install_handlers
from jaxmm.server.headers import HeaderLimitMiddleware
from jaxmm.server.metrics import CONTENT_TYPE, HTTPMetricsMiddleware, ServerMetrics
from jaxmm.server.security import APIKeyMiddleware, BodySizeLimitMiddleware
from jaxmm.server.state import ServerState

logger = logging.getLogger("jaxmm.server")
stats_logger = logging.getLogger("jaxmm.server.stats")

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
    response_role: str = "assistant",
    default_sampling_params: dict | None = None,
    allowed_origins: list[str] | None = None,
    allowed_methods: list[str] | None = None,
    allowed_headers: list[str] | None = None,
    allow_credentials: bool = False,
    root_path: str = "",
    log_stats: bool = False,
    log_stats_interval_s: float = 10.0,
    tool_call_parser: str | None = None,
    enable_auto_tool_choice: bool = False,
    reasoning_parser: str | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over `client`.

    `served_model_names`: the names requests may use in `model` (the first is the default
    when a request names none); `api_keys`: accepted bearer keys (none: no auth);
    `chat_template`: a Jinja template string overriding the tokenizer's;
    `shutdown_engine`: stop the engine when the app shuts down;
    `response_role`: the role of the assistant message in chat responses;
    `default_sampling_params`: SamplingParams values for fields a request leaves unset (from
    the generation config);
    `allowed_origins` (+ methods, headers, credentials): CORS, off when no origin is given;
    `root_path`: the path prefix a reverse proxy serves the app under;
    `tool_call_parser`, `enable_auto_tool_choice`, `reasoning_parser`: vLLM's flags of those
    names (server/chat_output.py);
    `log_stats`: log engine throughput and load every `log_stats_interval_s` while busy.
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
        response_role=response_role,
        default_sampling_params=dict(default_sampling_params or {}),
        tool_call_parser=tool_call_parser,
        enable_auto_tool_choice=enable_auto_tool_choice,
        reasoning_parser=reasoning_parser,
    )
    check_flags(tool_call_parser, reasoning_parser, enable_auto_tool_choice)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stats_task = None
        if log_stats:
            stats_task = asyncio.create_task(_log_stats(client.get_stats, log_stats_interval_s))
        yield
        if stats_task is not None:
            stats_task.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        if shutdown_engine:
            client.shutdown()

    root_path = root_path.rstrip("/")
    app = FastAPI(title="jaxmm OpenAI-compatible server", lifespan=lifespan)
    app.state.jaxmm = state
    install_handlers(app)
    modules = (model_cards, chat, completions, embeddings, transcriptions, tokenize)
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
    if root_path:
        app.add_middleware(RootPathMiddleware, root_path=root_path)
    if allowed_origins:
        # outermost: a browser's preflight carries no API key and must be answered here
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(allowed_origins),
            allow_methods=list(allowed_methods or ["*"]),
            allow_headers=list(allowed_headers or ["*"]),
            allow_credentials=allow_credentials,
        )
    # outermost of all: oversized headers get a 431 before anything else looks at them
    app.add_middleware(HeaderLimitMiddleware)
    return app


class RootPathMiddleware:
    """The app is reached under `root_path` behind a proxy. A proxy that forwards the full
    path (`/prefix/v1/models`) and one that strips the prefix (`/v1/models`) both work: the
    prefix is taken off the path, so the inner middlewares (open paths, metrics routes) and
    the router see `/v1/models`, and it is set as the ASGI root path, which links and the
    OpenAPI document's `servers` carry."""

    def __init__(self, app, root_path: str):
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            path, root = scope["path"], self.root_path
            if path == root or path.startswith(root + "/"):
                path = path[len(root) :] or "/"
            scope = dict(scope, path=path, root_path=root)
        await self.app(scope, receive, send)


async def _log_stats(get_stats, interval_s: float) -> None:
    """vLLM's periodic stats line: throughput since the last line, load, cache use. Quiet
    while the engine is idle."""
    prev, t_prev = get_stats(), time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        s, t = get_stats(), time.monotonic()
        dt = max(t - t_prev, 1e-9)
        prompt_tps = (s.get("prompt_tokens", 0) - prev.get("prompt_tokens", 0)) / dt
        gen_tps = (s.get("generation_tokens", 0) - prev.get("generation_tokens", 0)) / dt
        if prompt_tps or gen_tps or s.get("num_running") or s.get("num_waiting"):
            stats_logger.info(
                "avg prompt throughput: %.1f tokens/s, avg generation throughput: %.1f "
                "tokens/s, running: %d reqs, waiting: %d reqs, KV cache usage: %.1f%%, "
                "prefix cache hit rate: %.1f%%",
                prompt_tps,
                gen_tps,
                s.get("num_running", 0),
                s.get("num_waiting", 0),
                100 * (s.get("kv_cache_usage") or 0),
                100 * (s.get("prefix_cache_hit_rate") or 0),
            )
        prev, t_prev = s, t


def check_tls_files(ssl_keyfile: str | None, ssl_certfile: str | None) -> None:
    """Refuse a half or missing TLS setup before anything loads."""
    if ssl_keyfile and not ssl_certfile:
        raise ValueError("--ssl-keyfile needs --ssl-certfile")
    for path in (ssl_keyfile, ssl_certfile):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"TLS file {path!r} does not exist")


def uvicorn_config(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    *,
    ssl_keyfile: str | None = None,
    ssl_certfile: str | None = None,
    access_log: bool = True,
    **uvicorn_kwargs,
):
    """uvicorn's Config for `app`: TLS when a certificate is given, no access log (one line
    per request) when `access_log` is off; open streams get 5 s to finish on exit."""
    import uvicorn

    check_tls_files(ssl_keyfile, ssl_certfile)
    uvicorn_kwargs.setdefault("timeout_graceful_shutdown", 5)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        ssl_keyfile=ssl_keyfile,
        ssl_certfile=ssl_certfile,
        access_log=access_log,
        **uvicorn_kwargs,
    )


def serve(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **kwargs,
) -> None:
    """Run `app` under uvicorn until interrupted (`kwargs`: see `uvicorn_config`)."""
    from jaxmm.server.ready import ReadyServer

    server = ReadyServer(uvicorn_config(app, host, port, log_level, **kwargs))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
    if not server.started:
        raise SystemExit(3)  # could not bind, bad certificate, ...: uvicorn logged why
