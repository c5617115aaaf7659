"""vLLM's everyday server flags against a real uvicorn on 127.0.0.1: TLS, CORS, a root path
behind a proxy, the response role, sampling defaults from the generation config, request and
stats logging, and --max-logprobs through the real engine's validation.

Most run over the fake core engine (tests/server/fakes.py), whose completion j writes the
alphabet from letter j on, one letter a step."""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import threading
import time

import httpx
import pytest
import uvicorn
from openai import OpenAI

from jaxmm.engine.async_engine import AsyncEngine
from jaxmm.server.app import build_app, uvicorn_config
from tests.server.fakes import FakeCoreEngine
from tests.server.util import running_server

KEY = "sk-flags"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "http://ui.example"


@contextlib.contextmanager
def fake_app(**app_kw):
    client = AsyncEngine(FakeCoreEngine(max_model_len=64, slow_step_s=0.05))
    try:
        yield build_app(client, served_model_names=["fake"], api_keys=[KEY], **app_kw)
    finally:
        client.shutdown()


@contextlib.contextmanager
def uvicorn_running(app, **config_kw):
    """`serve()`'s own uvicorn Config (jaxmm.server.app.uvicorn_config) on a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn_config(app, "127.0.0.1", sock.getsockname()[1], "info", **config_kw)
    config.timeout_graceful_shutdown = 2
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def chat(content: str = "hi", **kw) -> dict:
    return {"model": "fake", "messages": [{"role": "user", "content": content}], **kw}


@pytest.fixture(scope="module")
def flagged():
    """An app with every option on: role, defaults, CORS, root path, stats every 50 ms."""
    with fake_app(
        response_role="bot",
        default_sampling_params={"max_tokens": 3},
        allowed_origins=[ORIGIN],
        root_path="/llm/",
        log_stats=True,
        log_stats_interval_s=0.05,
    ) as app:
        with running_server(app) as url:
            yield url


@pytest.fixture(scope="module")
def plain():
    with fake_app() as app:
        with running_server(app) as url:
            yield url


# -- --response-role, --generation-config defaults ------------------------------------------


def test_response_role_and_sampling_defaults(flagged):
    with httpx.Client(base_url=flagged, headers=AUTH, timeout=30) as http:
        body = http.post("/v1/chat/completions", json=chat()).json()
        # no max_tokens in the request: the server's default (generation config) applies
        assert body["choices"][0]["message"] == {"role": "bot", "content": "abc"}
        body = http.post("/v1/chat/completions", json=chat(max_tokens=5)).json()
        assert body["choices"][0]["message"]["content"] == "abcde"  # the request's own wins
        with http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert '"role":"bot"' in first.replace(" ", "")


def test_defaults_off(plain):
    with httpx.Client(base_url=plain, headers=AUTH, timeout=30) as http:
        body = http.post("/v1/chat/completions", json=chat(max_tokens=4)).json()
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "abcd"}


# -- CORS -------------------------------------------------------------------------------------


def test_cors(flagged, plain):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    with httpx.Client(base_url=flagged, timeout=30) as http:
        # a browser's preflight carries no API key: answered before the key check
        r = http.options("/v1/chat/completions", headers=preflight)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in r.headers["access-control-allow-methods"]
        r = http.get("/v1/models", headers={**AUTH, "Origin": ORIGIN})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        r = http.options("/v1/models", headers={**preflight, "Origin": "http://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    with httpx.Client(base_url=plain, timeout=30) as http:  # no --allowed-origins: no CORS
        r = http.get("/v1/models", headers={**AUTH, "Origin": ORIGIN})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# -- --root-path ------------------------------------------------------------------------------


def test_root_path(flagged):
    # a proxy that keeps the prefix, and one that strips it: both reach the routes
    client = OpenAI(base_url=f"{flagged}/llm/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["fake"]
    client = OpenAI(base_url=f"{flagged}/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["fake"]
    with httpx.Client(base_url=flagged, timeout=30) as http:
        assert http.get("/llm/health").status_code == 200  # still open without a key
        assert http.get("/llm/v1/models").status_code == 401
        openapi = http.get("/llm/openapi.json", headers=AUTH).json()
        assert openapi["servers"] == [{"url": "/llm"}]  # links carry the prefix


# -- --disable-log-stats ----------------------------------------------------------------------


def test_stats_lines_while_busy(flagged, plain, caplog):
    caplog.set_level(logging.INFO, logger="jaxmm.server.stats")
    for url in (plain, flagged):
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
            r = http.post("/v1/chat/completions", json=chat("SLOW", max_tokens=8))
            assert r.status_code == 200
        time.sleep(0.1)
        lines = [r.getMessage() for r in caplog.records if r.name == "jaxmm.server.stats"]
        if url == plain:
            assert lines == []  # log_stats off (--disable-log-stats)
    assert any("running: 1 reqs" in line for line in lines), lines
    assert all("KV cache usage: 25.0%" in line for line in lines)


# -- --ssl-keyfile / --ssl-certfile, --disable-log-requests -----------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1"]
        + ["-subj", "/CN=127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(key), str(cert)


def test_tls(tls_files):
    key, cert = tls_files
    with fake_app() as app, uvicorn_running(app, ssl_keyfile=key, ssl_certfile=cert) as port:
        http = httpx.Client(verify=False, timeout=30)
        client = OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key=KEY, http_client=http)
        r = client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert r.choices[0].message.content == "ab"
        with pytest.raises(httpx.HTTPError):  # plain http to the TLS port
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)


def test_access_log(capfd):
    for access_log in (True, False):
        with fake_app() as app, uvicorn_running(app, access_log=access_log) as port:
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        out = capfd.readouterr()
        logged = '"GET /health HTTP/1.1" 200' in out.out + out.err
        assert logged is access_log


# -- --max-logprobs through the real engine ---------------------------------------------------


def test_max_logprobs_is_a_400(ckpt_root):
    from tests.helpers import make_checkpoint
    from tests.server.live_util import live_server

    path = make_checkpoint(ckpt_root, "llama")
    kw = dict(max_model_len=64, max_num_batched_tokens=16, kv_cache_memory_bytes=2 << 20)
    with live_server(path, engine_process=False, max_logprobs=1, **kw) as (_, url):
        client = OpenAI(base_url=f"{url}/v1", api_key="sk-test")
        with pytest.raises(Exception) as e:
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2,
                logprobs=True,
                top_logprobs=2,
            )
        assert getattr(e.value, "status_code", None) == 400, e.value
        assert "max_logprobs" in str(e.value)
