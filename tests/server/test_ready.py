"""`jaxmm serve`'s last start-up line: "ready on URL", said once the socket accepts, with
the port actually bound and the root path."""

from __future__ import annotations

import logging
import threading
import time

import httpx
import uvicorn

from jaxmm.engine.async_engine import AsyncEngine
from jaxmm.server.app import build_app
from jaxmm.server.ready import ReadyServer
from tests.server.fakes import FakeCoreEngine


def test_ready_line_names_a_url_that_answers(caplog):
    client = AsyncEngine(FakeCoreEngine())
    app = build_app(client, served_model_names=["fake"])
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = ReadyServer(config)
    thread = threading.Thread(target=server.run, daemon=True)
    try:
        with caplog.at_level(logging.INFO, logger="jaxmm"):
            thread.start()
            deadline = time.monotonic() + 30
            while not server.started:
                assert thread.is_alive() and time.monotonic() < deadline
                time.sleep(0.02)
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ready on")]
        assert len(lines) == 1, caplog.text
        url = lines[0].removeprefix("ready on ")
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        assert httpx.get(url + "/health", timeout=10).status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
        client.shutdown()
