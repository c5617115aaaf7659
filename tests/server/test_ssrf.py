"""SSRF through the server: chat requests whose image_url points at a local "trap" HTTP
server (or at a cloud metadata address, or at local files) are refused with 400, and the
trap sees zero connections. The text-only model refuses media parts before any fetch, so
this runs over the tiny Qwen2-VL, whose front end really fetches. Every outgoing TCP
connection is also watched: none may go anywhere but 127.0.0.1."""

from __future__ import annotations

import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.models.test_vlm_parity import make_vlm
from tests.server.live_util import KEY, NAME, live_server, wait_clean

AUTH = {"Authorization": f"Bearer {KEY}"}


class Trap:
    """A TCP listener on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            conn.close()

    def close(self):
        self._stop = True
        self.sock.close()


@pytest.fixture(scope="module")
def trap():
    t = Trap()
    yield t
    t.close()


@pytest.fixture(scope="module")
def redirector(trap):
    """An HTTP server whose paths redirect to the trap and other forbidden places."""
    targets = {
        "/to-trap": f"http://127.0.0.1:{trap.port}/x.png",
        "/to-trap-name": f"http://trap.test:{trap.port}/x.png",
        "/to-metadata": "http://169.254.169.254/latest/meta-data/",
        "/to-file": "file:///etc/passwd",
    }
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(302)
            self.send_header("Location", targets.get(self.path, targets["/to-trap"]))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], hits
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def live(ckpt_root):
    path = make_vlm(ckpt_root, "qwen2_vl")
    kw = dict(dtype="float32", max_model_len=256, max_num_batched_tokens=64)
    # the engine on a thread of this process: the fake DNS and the connection guard below
    # patch this process's sockets, where the front end then fetches
    with live_server(path, limit_mm_per_prompt={"image": 2}, engine_process=False, **kw) as x:
        yield x


@pytest.fixture
def net(monkeypatch):
    """Fake DNS for a few names, and a record of every outgoing TCP connection, refusing
    any that is not to 127.0.0.1 (no traffic may leave this machine)."""
    real_gai, real_cc = socket.getaddrinfo, socket.create_connection
    table = {
        "cdn.example.com": "127.0.0.1",  # a public-looking name that resolves to loopback
        "media.test": "127.0.0.1",
        "trap.test": "127.0.0.1",
        "metadata.test": "169.254.169.254",
        "internal.test": "10.0.0.7",
    }
    connects: list = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host in table:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (table[host], port))]
        return real_gai(host, port, *args, **kwargs)

    def create_connection(address, *args, **kwargs):
        connects.append(address)
        if address[0] not in ("127.0.0.1", "localhost"):
            raise OSError(f"test guard: no connection to {address[0]}")
        return real_cc(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return connects


def set_policy(engine, **kw):
    from jaxmm.multimodal.fetch import MediaPolicy

    engine.mm_frontend().policy = MediaPolicy(allow_redirects=True, image_timeout_s=3.0, **kw)


def ask(url: str, image_url: str) -> httpx.Response:
    body = {
        "model": NAME,
        "max_tokens": 2,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
    }
    return httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)


def refused(r: httpx.Response, *words: str, hidden: str | None = None) -> None:
    assert r.status_code == 400, r.text[:300]
    msg = r.json()["error"]["message"]
    if hidden:  # the address a name resolved to is never named
        assert hidden not in msg, msg
    for w in words:
        assert w in msg, msg


def test_trap_direct_loopback(live, trap, net):
    engine, url = live
    set_policy(engine)  # the default: public hosts only
    before = trap.count
    refused(ask(url, f"http://127.0.0.1:{trap.port}/x.png"), "loopback")
    refused(ask(url, f"http://localhost:{trap.port}/x.png"))
    refused(ask(url, f"http://[::1]:{trap.port}/x.png"))
    refused(ask(url, f"http://2130706433:{trap.port}/x.png"))  # 127.0.0.1 as one integer
    refused(
        ask(url, f"http://cdn.example.com:{trap.port}/x.png"), "loopback", hidden="127.0.0.1"
    )  # DNS -> 127/8
    refused(ask(url, "http://internal.test/x.png"), "private", hidden="10.0.0.7")
    assert trap.count == before
    assert httpx.get(url + "/health").status_code == 200
    wait_clean(engine)


def test_allowed_domain_redirecting_to_trap(live, trap, redirector, net):
    engine, url = live
    port, hits = redirector
    # media.test is listed exactly, so it may be local; redirects are followed, hop by hop
    set_policy(engine, allowed_media_domains=("media.test",))
    before, n_hits = trap.count, len(hits)
    for path in ("/to-trap", "/to-trap-name", "/to-metadata", "/to-file"):
        refused(ask(url, f"http://media.test:{port}{path}"))
    assert len(hits) == n_hits + 4  # the allowed host was reached, every hop after refused
    assert trap.count == before
    # the same with the default policy (any public host): the redirector itself is loopback
    set_policy(engine)
    refused(ask(url, f"http://cdn.example.com:{port}/to-trap"), "loopback")
    assert len(hits) == n_hits + 4 and trap.count == before
    wait_clean(engine)


def test_metadata_address(live, trap, net):
    engine, url = live
    for domains in (None, ("metadata.test", "169.254.169.254")):  # even when listed
        set_policy(engine, allowed_media_domains=domains)
        refused(ask(url, "http://169.254.169.254/latest/meta-data/iam/x.png"))
        refused(ask(url, "http://metadata.test/latest/meta-data/x.png"), hidden="169.254")
        refused(ask(url, "http://[::ffff:169.254.169.254]/x.png"))
    assert not [a for a in net if a[0] != "127.0.0.1"]  # no connection was even attempted
    wait_clean(engine)


def test_file_urls(live, tmp_path, net):
    engine, url = live
    set_policy(engine)  # file:// off by default
    refused(ask(url, "file:///etc/passwd"))
    media = tmp_path / "media"
    media.mkdir()
    (tmp_path / "secret.png").write_bytes(b"not for you")
    os.symlink(tmp_path / "secret.png", media / "link.png")
    set_policy(engine, allowed_local_media_path=str(media))
    for u in (
        f"file://{media}/../secret.png",
        f"file://{media}/%2e%2e/secret.png",
        f"file://{media}/link.png",  # a symlink out of the directory
        "file:///etc/passwd",
        f"file://{media}/../../../../etc/passwd",
        "file://otherhost/etc/passwd",
    ):
        r = ask(url, u)
        refused(r)
        assert "root:" not in r.text and "not for you" not in r.text
    wait_clean(engine)


def test_positive_control_trap_counts(live, trap, net):
    """The trap does count: a host listed exactly is fetched (and fails: the trap hangs up)."""
    engine, url = live
    set_policy(engine, allowed_media_domains=("trap.test",))
    before = trap.count
    r = ask(url, f"http://trap.test:{trap.port}/x.png")
    assert r.status_code == 400
    assert trap.count == before + 1
    set_policy(engine)
    wait_clean(engine)


def test_placeholder_text_without_image(live):
    """Image placeholder tokens typed as text: without an image part they are plain text;
    next to an image, the placeholder count disagrees with the items and is refused."""
    engine, url = live
    body = {
        "model": NAME,
        "max_tokens": 2,
        "messages": [
            {"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|>" * 3}
        ],
    }
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text[:300]  # plain text: no encoder output is merged
    # placeholders typed next to a real image: the counts disagree -> refused, never a 500
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (200, 30, 30)).save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body["messages"] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "<|vision_start|><|image_pad|><|vision_end|>" * 2},
                {"type": "image_url", "image_url": {"url": data_url}},
            ],
        }
    ]
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text[:300]
    assert "placeholder" in r.json()["error"]["message"]
    assert httpx.get(url + "/health").status_code == 200
    wait_clean(engine)
