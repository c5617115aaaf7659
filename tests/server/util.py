"""Run an ASGI app under a real uvicorn on 127.0.0.1 (a free port) in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import types

import uvicorn

from jaxmm.engine.core_process import ProcessEngine


@contextlib.contextmanager
def running_server(app):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def core_state(engine) -> dict:
    """Run in an engine process (ProcessEngine.call): what the tests read of its engine."""
    return {
        "unfinished": engine.has_unfinished_requests(),
        "stats": dict(engine.stats),
        "usage": engine.block_manager.usage,
        "free": engine.block_manager.num_free_blocks,
        "blocks": engine.block_manager.num_blocks,
    }


class CoreProbe:
    """The parts of an LLMEngine the server tests read, for an engine in its own process."""

    def __init__(self, client: ProcessEngine):
        self.client = client

    def state(self) -> dict:
        return self.client.call(core_state, timeout=60)

    def has_unfinished_requests(self) -> bool:
        return self.state()["unfinished"]

    @property
    def stats(self) -> dict:
        return self.state()["stats"]

    @property
    def block_manager(self):
        s = self.state()
        return types.SimpleNamespace(
            usage=s["usage"], num_free_blocks=s["free"], num_blocks=s["blocks"]
        )
