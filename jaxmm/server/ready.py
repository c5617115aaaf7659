"""uvicorn's server, saying "ready on http://HOST:PORT" once its sockets accept connections.

The engine's start-up (loading, compiling) happens before uvicorn starts, with its own
progress lines (`jaxmm.progress`); this is the last line of a start, the moment a client
may connect.
"""

from __future__ import annotations

import socket

import uvicorn

from jaxmm import progress


def ready_url(config: uvicorn.Config, servers: list) -> str:
    """The URL clients reach: the bound port (a port of 0 picks one), the root path."""
    scheme = "https" if config.is_ssl else "http"
    host, port = config.host, config.port
    for server in servers:
        for sock in server.sockets or ():
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                port = sock.getsockname()[1]
                break
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{config.root_path.rstrip('/')}"


class ReadyServer(uvicorn.Server):
    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            progress.note("ready on %s", ready_url(self.config, self.servers))
