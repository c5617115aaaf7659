"""Shared pieces of the live-server proof tests (load, fuzz, SSRF, hostile inputs)."""

from __future__ import annotations

import contextlib
import time

from jaxmm import LLM
from jaxmm.engine.async_engine import AsyncEngine
from jaxmm.engine.core_process import ProcessEngine
from jaxmm.llm import engine_config
from jaxmm.server.app import build_app
from tests.server.util import CoreProbe, running_server

KEY = "sk-test"
NAME = "tiny"


@contextlib.contextmanager
def live_server(path: str, *, app_kw: dict | None = None, engine_process=None, **engine_kw):
    """(engine, base URL) of a real uvicorn over the engine `jaxmm serve` would run: the
    core in a process of its own (`engine` then reads the core's state through calls), or,
    with engine_process=False, on a thread of this process (`engine` is the LLMEngine)."""
    if engine_process is None:
        engine_process = True
    if engine_process:
        client = ProcessEngine(engine_config(model=path, **engine_kw))
        engine = CoreProbe(client)
    else:
        engine = LLM(path, **engine_kw).llm_engine
        client = AsyncEngine(engine)
    kw = dict(served_model_names=[NAME], model_path=path, api_keys=KEY)
    kw.update(app_kw or {})
    app = build_app(client, **kw)
    try:
        with running_server(app) as url:
            yield engine, url
    finally:
        client.shutdown()


def wait_clean(engine, timeout: float = 30.0) -> None:
    """No unfinished request and every KV page back in the free pool."""
    deadline = time.monotonic() + timeout
    bm = engine.block_manager
    while time.monotonic() < deadline:
        if not engine.has_unfinished_requests() and bm.num_free_blocks == bm.num_blocks:
            return
        time.sleep(0.05)
    assert not engine.has_unfinished_requests(), "requests left unfinished"
    assert bm.num_free_blocks == bm.num_blocks, (bm.num_free_blocks, bm.num_blocks)
