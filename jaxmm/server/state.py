"""The server's state and what every endpoint does first: find the state, check the model
name (404), and run blocking front-end work in the server's thread pool."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from jaxmm.engine.async_engine import EngineClient
from jaxmm.server.errors import APIError
from jaxmm.server.metrics import ServerMetrics


@dataclass
class ServerState:
    client: EngineClient
    served_model_names: list[str]
    model_path: str
    metrics: ServerMetrics
    pool: ThreadPoolExecutor
    chat_template: str | None = None
    trust_request_chat_template: bool = False
    response_role: str = "assistant"  # --response-role
    # SamplingParams values for fields a request leaves unset (--generation-config)
    default_sampling_params: dict = field(default_factory=dict)
    # tool calls and reasoning (--tool-call-parser, --enable-auto-tool-choice,
    # --reasoning-parser): chat_output.py
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def default_model(self) -> str:
        return self.served_model_names[0]


def get_state(request: Request) -> ServerState:
    return request.app.state.jaxmm


def _clip(text: str, limit: int = 100) -> str:
    """A client's string, cut short enough to quote back in an error message."""
    return text if len(text) <= limit else text[:limit] + "..."


def check_model(state: ServerState, name: str | None) -> str:
    """The served name a request addresses; 404 when the server does not serve it."""
    if not name:
        return state.default_model
    if name not in state.served_model_names:
        raise APIError(
            404,
            f"the model {_clip(name)!r} does not exist; this server serves "
            f"{', '.join(repr(n) for n in state.served_model_names)}",
            type="NotFoundError",
            param="model",
            code="model_not_found",
        )
    return name


async def run_blocking(state: ServerState, fn: Callable, *args, **kwargs) -> Any:
    """Run blocking front-end work (tokenizer, templates, media) in the server's pool."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(state.pool, functools.partial(fn, *args, **kwargs))
