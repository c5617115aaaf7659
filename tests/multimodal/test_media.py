"""Media fetching and decoding against a real HTTP server on 127.0.0.1.

The server sits on loopback, so every fetch test exercises both halves of the address
rule: refused by default, allowed when the host is listed in `allowed_media_domains`.
"""

from __future__ import annotations

import base64
import gzip
import io
import ipaddress
import socket
import struct
import threading
import time
import urllib.parse
import warnings
import wave
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest
from PIL import Image

from jaxmm.multimodal import fetch as fetch_module
from jaxmm.multimodal.fetch import (
    MediaError,
    MediaPolicy,
    address_category,
    decode_base64_payload,
    fetch_bytes,
    parse_data_url,
)
from jaxmm.multimodal.media import (
    load_audio,
    load_image,
    load_video,
    load_video_with_metadata,
    read_frames,
    sample_frame_indices,
)

LOCAL = ("127.0.0.1",)


def policy(**overrides) -> MediaPolicy:
    """A policy that does not depend on the environment of the test run."""
    values = dict(
        allow_redirects=False,
        image_timeout_s=5.0,
        video_timeout_s=5.0,
        audio_timeout_s=5.0,
        max_download_bytes=8 * 1024 * 1024,
        max_image_pixels=64 * 1024 * 1024,
        max_video_frames=64,
        max_video_pixels=512 * 1024 * 1024,
        max_audio_duration_s=60.0,
    )
    values.update(overrides)
    return MediaPolicy(**values)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


RED_PNG = png_bytes(Image.new("RGB", (8, 6), (255, 0, 0)))


def rgba_image() -> Image.Image:
    """Row 0: fully transparent; row 1: opaque blue; row 2: half-transparent red."""
    image = Image.new("RGBA", (4, 3), (0, 0, 0, 0))
    for x in range(4):
        image.putpixel((x, 1), (0, 0, 255, 255))
        image.putpixel((x, 2), (255, 0, 0, 128))
    return image


RGBA_PNG = png_bytes(rgba_image())


def png_header(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height: enough for Image.open."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def avi_bytes(num_frames: int = 10, width: int = 48, height: int = 32) -> bytes:
    """An MJPG AVI whose frame i has red = 25 i, green = 255 - 25 i, blue = 0."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/v.avi"
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10, (width, height))
        assert writer.isOpened()
        for i in range(num_frames):
            frame = np.zeros((height, width, 3), np.uint8)  # BGR
            frame[..., 2] = 25 * i
            frame[..., 1] = 255 - 25 * i
            writer.write(frame)
        writer.release()
        with open(path, "rb") as f:
            return f.read()


VIDEO = avi_bytes()


def frame_colors(video: np.ndarray) -> np.ndarray:
    return video.reshape(len(video), -1, 3).mean(axis=1)


# ---------------------------------------------------------------------------------------
# A local HTTP server


class Handler(BaseHTTPRequestHandler):
    hosts_seen: list[str] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, body: bytes, ctype: str = "application/octet-stream", code: int = 200):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):  # one branch per route
        Handler.hosts_seen.append(self.headers.get("Host", ""))
        path = urllib.parse.urlsplit(self.path).path
        port = self.server.server_address[1]
        try:
            if path == "/img.png":
                self._send(RED_PNG, "image/png; charset=binary")
            elif path == "/rgba.png":
                self._send(RGBA_PNG, "image/png")
            elif path == "/video.avi":
                self._send(VIDEO, "video/x-msvideo")
            elif path == "/redirect":
                self._redirect("/img.png")
            elif path.startswith("/chain/"):
                n = int(path.rsplit("/", 1)[1])
                self._redirect(f"/chain/{n - 1}" if n > 0 else "/img.png")
            elif path == "/redirect-localhost":
                self._redirect(f"http://localhost:{port}/img.png")
            elif path == "/redirect-file":
                self._redirect("file:///etc/passwd")
            elif path == "/huge":  # no Content-Length: the cap must hold while streaming
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(64):
                    self.wfile.write(b"\x00" * 65536)
            elif path == "/huge-declared":
                self.send_response(200)
                self.send_header("Content-Length", str(10**9))
                self.end_headers()
                self.wfile.write(b"\x00" * 1024)
            elif path == "/gzip-bomb":
                body = gzip.compress(b"\x00" * (4 * 1024 * 1024))
                self.send_response(200)
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif path == "/slow":
                time.sleep(3.0)
                self._send(RED_PNG, "image/png")
            elif path == "/drip":  # each read is quick, the whole body is not
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self._send(b"not found", "text/plain", code=404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on purpose (cap or timeout)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def fake_dns(monkeypatch):
    """Resolve chosen names to chosen addresses; count lookups; literals pass through."""
    real = socket.getaddrinfo
    table: dict[str, list[str]] = {}
    calls: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host in table:
            calls.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in table[host]]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table, calls


# ---------------------------------------------------------------------------------------
# http(s): address rules, domain allowlist, pinning


def test_loopback_refused_by_default_and_allowed_when_listed(server):
    with pytest.raises(MediaError, match="loopback") as info:
        fetch_bytes(f"{server}/img.png", "image", policy())
    assert info.value.status == 403
    data, ctype = fetch_bytes(f"{server}/img.png", "image", policy(allowed_media_domains=LOCAL))
    assert data == RED_PNG and ctype == "image/png"
    image = load_image(f"{server}/img.png", policy(allowed_media_domains=LOCAL))
    assert image.mode == "RGB" and image.size == (8, 6)


def test_localhost_name_refused_without_leaking_the_address(server):
    port = server.rsplit(":", 1)[1]
    with pytest.raises(MediaError) as info:
        fetch_bytes(f"http://localhost:{port}/img.png", "image", policy())
    assert "loopback" in str(info.value) and "127.0.0.1" not in str(info.value)
    # Listing 127.0.0.1 does not open the name localhost.
    with pytest.raises(MediaError, match="not in the allowed media domains"):
        fetch_bytes(
            f"http://localhost:{port}/img.png", "image", policy(allowed_media_domains=LOCAL)
        )


def test_domain_allowlist(server, fake_dns):
    with pytest.raises(MediaError, match="not in the allowed media domains") as info:
        fetch_bytes(f"{server}/img.png", "image", policy(allowed_media_domains=("example.com",)))
    assert info.value.status == 403
    allowed = fetch_module._domain_allowed
    domains = ("example.com",)
    assert allowed("example.com", domains) and allowed("cdn.example.com", domains)
    assert not allowed("badexample.com", domains)
    assert not allowed("example.com.evil.net", domains)
    # Entries are normalised like hosts are.
    assert MediaPolicy(allowed_media_domains=("Example.COM.",)).allowed_media_domains == domains


def test_private_address_refused_unless_host_listed_exactly(server, fake_dns):
    table, calls = fake_dns
    port = server.rsplit(":", 1)[1]
    table["evil.test"] = ["10.1.2.3"]
    with pytest.raises(MediaError, match="private") as info:
        fetch_bytes(f"http://evil.test:{port}/img.png", "image", policy())
    assert "10.1.2.3" not in str(info.value)
    # A name that resolves to several addresses is refused if any of them is not public.
    table["mixed.test"] = ["93.184.216.34", "127.0.0.1"]
    with pytest.raises(MediaError, match="loopback"):
        fetch_bytes(f"http://mixed.test:{port}/img.png", "image", policy())
    # A parent domain in the list opens the subdomain, but not its private addresses.
    table["img.media.test"] = ["127.0.0.1"]
    parent = policy(allowed_media_domains=("media.test",))
    with pytest.raises(MediaError, match="loopback"):
        fetch_bytes(f"http://img.media.test:{port}/img.png", "image", parent)
    # Listed exactly: fetched, from the address checked (resolved once: no rebinding window),
    # with the name in the Host header.
    calls.clear()
    Handler.hosts_seen.clear()
    exact = policy(allowed_media_domains=("img.media.test",))
    data, _ = fetch_bytes(f"http://img.media.test:{port}/img.png", "image", exact)
    assert data == RED_PNG
    assert calls == ["img.media.test"]
    assert Handler.hosts_seen == [f"img.media.test:{port}"]


def test_connection_pinned_to_checked_address(server, monkeypatch):
    """DNS rebinding: a second lookup of the name would answer a private address the
    check never saw; the fetch must connect to the first answer without asking again."""
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1", "10.9.9.9", "10.9.9.9"])
    lookups = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    port = server.rsplit(":", 1)[1]
    exact = policy(allowed_media_domains=("rebind.test",), image_timeout_s=2.0)
    data, _ = fetch_bytes(f"http://rebind.test:{port}/img.png", "image", exact)
    assert data == RED_PNG and lookups == ["rebind.test"]


def test_https_request_pinned_with_name_for_tls(fake_dns):
    """https: the request goes to the checked IP, while Host and the TLS SNI (which the
    certificate is verified against) carry the name."""
    table, _ = fake_dns
    table["img.media.test"] = ["127.0.0.1"]
    exact = policy(allowed_media_domains=("img.media.test",))
    request = fetch_module._check_http_url(
        "https://img.media.test:8443/a.png?x=1", exact, time.monotonic() + 5, "image"
    )
    assert str(request.pinned_url) == "https://127.0.0.1:8443/a.png?x=1"
    assert request.headers["Host"] == "img.media.test:8443"
    assert request.extensions == {"sni_hostname": "img.media.test"}


def test_cloud_metadata_refused_even_when_listed():
    listed = policy(allowed_media_domains=("169.254.169.254", "fd00:ec2::254"))
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/"):
        with pytest.raises(MediaError, match="cloud metadata") as info:
            fetch_bytes(url, "image", listed)
        assert info.value.status == 403


@pytest.mark.parametrize(
    "address, category",
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("10.0.0.1", "private"),
        ("192.168.1.1", "private"),
        ("172.16.0.1", "private"),
        ("fc00::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-public"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("93.184.216.34", None),
        ("2606:2800:220:1:248:1893:25c8:1946", None),
    ],
)
def test_address_category(address, category):
    assert address_category(ipaddress.ip_address(address)) == category


def test_http_errors(server):
    allowed = policy(allowed_media_domains=LOCAL)
    with pytest.raises(MediaError, match="HTTP 404"):
        fetch_bytes(f"{server}/missing", "image", allowed)
    # Nothing listens on port 1: a connection error, named as such.
    with pytest.raises(MediaError, match="could not fetch"):
        fetch_bytes("http://127.0.0.1:1/x", "image", allowed)


# ---------------------------------------------------------------------------------------
# http(s): byte cap, timeouts, redirects


def test_byte_cap_enforced_while_streaming(server):
    small = policy(allowed_media_domains=LOCAL, max_download_bytes=100_000)
    with pytest.raises(MediaError, match="larger than") as info:
        fetch_bytes(f"{server}/huge", "image", small)
    assert info.value.status == 413
    with pytest.raises(MediaError, match="larger than") as info:
        fetch_bytes(f"{server}/huge-declared", "image", small)
    assert info.value.status == 413
    # A compressed body sent anyway is capped on its decoded size.
    with pytest.raises(MediaError, match="larger than"):
        fetch_bytes(f"{server}/gzip-bomb", "image", small)


def test_timeouts(server):
    fast = policy(allowed_media_domains=LOCAL, image_timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(MediaError, match="timed out"):
        fetch_bytes(f"{server}/slow", "image", fast)
    assert time.monotonic() - start < 2.5  # 0.5 s + slack for a loaded CI box
    # The deadline covers the whole body, not only each read.
    start = time.monotonic()
    with pytest.raises(MediaError, match="timed out"):
        fetch_bytes(f"{server}/drip", "image", fast)
    assert time.monotonic() - start < 2.5  # 0.5 s + slack for a loaded CI box
    # Per kind: the video timeout is not the image one.
    assert policy(video_timeout_s=7.0).timeout_for("video") == 7.0


def test_redirects(server):
    with pytest.raises(MediaError, match="redirect") as info:
        fetch_bytes(f"{server}/redirect", "image", policy(allowed_media_domains=LOCAL))
    assert info.value.status == 403
    follow = policy(allowed_media_domains=LOCAL, allow_redirects=True)
    assert fetch_bytes(f"{server}/redirect", "image", follow)[0] == RED_PNG
    assert fetch_bytes(f"{server}/chain/4", "image", follow)[0] == RED_PNG  # 5 hops
    with pytest.raises(MediaError, match="more than 5"):
        fetch_bytes(f"{server}/chain/5", "image", follow)
    # Each hop is checked again: a hop to a host not listed, or to file://, is refused.
    with pytest.raises(MediaError, match="not in the allowed media domains"):
        fetch_bytes(f"{server}/redirect-localhost", "image", follow)
    with pytest.raises(MediaError, match="non-http"):
        fetch_bytes(f"{server}/redirect-file", "image", follow)


def test_redirects_default_from_env(monkeypatch):
    monkeypatch.setenv("JAXMM_MEDIA_URL_ALLOW_REDIRECTS", "1")
    monkeypatch.setenv("JAXMM_IMAGE_FETCH_TIMEOUT", "2.5")
    monkeypatch.setenv("JAXMM_ALLOWED_MEDIA_DOMAINS", "a.example, b.example")
    assert MediaPolicy().allow_redirects is True
    assert MediaPolicy().image_timeout_s == 2.5
    assert MediaPolicy().allowed_media_domains is None  # access fields only via from_env
    env = MediaPolicy.from_env(audio_timeout_s=3.0)
    assert env.allowed_media_domains == ("a.example", "b.example")
    assert env.audio_timeout_s == 3.0
    monkeypatch.setenv("JAXMM_MEDIA_URL_ALLOW_REDIRECTS", "maybe")
    with pytest.raises(ValueError, match="JAXMM_MEDIA_URL_ALLOW_REDIRECTS"):
        MediaPolicy()
    monkeypatch.delenv("JAXMM_MEDIA_URL_ALLOW_REDIRECTS")
    assert MediaPolicy().allow_redirects is False
    with pytest.raises(ValueError, match="max_download_bytes"):
        MediaPolicy(max_download_bytes=0)
    with pytest.raises(ValueError, match="absolute"):
        MediaPolicy(allowed_local_media_path="relative/dir")


# ---------------------------------------------------------------------------------------
# Schemes, data: URLs, base64


def test_unsupported_schemes_refused():
    for url in ("ftp://example.com/a.png", "gopher://x/", "javascript:alert(1)", "C:\\a.png"):
        with pytest.raises(MediaError, match="unsupported URL scheme"):
            fetch_bytes(url, "image", policy())
    with pytest.raises(MediaError, match="not a URL"):
        fetch_bytes("/etc/passwd", "image", policy())
    with pytest.raises(ValueError, match="kind"):
        fetch_bytes("data:,x", "document", policy())


def test_data_urls():
    url = "data:image/png;base64," + base64.b64encode(RED_PNG).decode()
    data, mime = fetch_bytes(url, "image", policy())
    assert data == RED_PNG and mime == "image/png"
    assert load_image(url, policy()).getpixel((0, 0)) == (255, 0, 0)
    assert parse_data_url("data:text/plain,a%20b") == (b"a b", "text/plain")
    assert parse_data_url("data:;base64,AAE=") == (b"\x00\x01", None)
    with pytest.raises(MediaError, match="not valid base64"):
        fetch_bytes("data:image/png;base64,@@@@", "image", policy())
    with pytest.raises(MediaError, match="larger than") as info:
        fetch_bytes(url, "image", policy(max_download_bytes=10))
    assert info.value.status == 413
    with pytest.raises(MediaError) as info:
        fetch_bytes("data:image/png;base64," + "A" * 100, "image", policy(max_download_bytes=10))
    assert "AAAA" not in str(info.value)  # payloads are never echoed


def test_decode_base64_payload():
    raw = bytes(range(256)) * 3
    b64 = base64.b64encode(raw).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    assert decode_base64_payload(wrapped) == raw
    assert decode_base64_payload(b64.rstrip("=")) == raw  # padding dropped by the client
    assert decode_base64_payload(base64.urlsafe_b64encode(raw)) == raw
    assert decode_base64_payload("data:audio/wav;base64," + b64) == raw
    with pytest.raises(MediaError, match="larger than"):
        decode_base64_payload(b64, max_bytes=100)
    with pytest.raises(MediaError, match="not valid base64"):
        decode_base64_payload("abc!def=")
    with pytest.raises(MediaError, match="non-ASCII"):
        decode_base64_payload("ÄÖÜ=")
    with pytest.raises(MediaError, match="truncated"):
        decode_base64_payload("abcde")
    with pytest.raises(MediaError, match="empty"):
        decode_base64_payload("")


# ---------------------------------------------------------------------------------------
# file://


@pytest.fixture
def media_dirs(tmp_path):
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "red image.png").write_bytes(RED_PNG)
    (outside / "secret.png").write_bytes(RED_PNG)
    (allowed / "escape.png").symlink_to(outside / "secret.png")
    (allowed / "inner.png").symlink_to(allowed / "red image.png")
    (allowed / "sub").mkdir()
    return allowed, outside


def file_url(path) -> str:
    return "file://" + urllib.parse.quote(str(path))


def test_file_urls(media_dirs):
    allowed, outside = media_dirs
    local = policy(allowed_local_media_path=str(allowed))
    data, mime = fetch_bytes(file_url(allowed / "red image.png"), "image", local)
    assert data == RED_PNG and mime == "image/png"
    assert load_image(file_url(allowed / "inner.png"), local).size == (8, 6)
    refused = [
        outside / "secret.png",
        allowed / "escape.png",  # a symlink inside pointing outside
        allowed / ".." / "outside" / "secret.png",
        outside / "does-not-exist.png",  # outside: refused before existence is checked
    ]
    for path in refused:
        with pytest.raises(MediaError, match="outside the allowed") as info:
            fetch_bytes(file_url(path), "image", local)
        assert info.value.status == 403
    with pytest.raises(MediaError, match="no such file"):
        fetch_bytes(file_url(allowed / "missing.png"), "image", local)
    with pytest.raises(MediaError, match="not a regular file"):
        fetch_bytes(file_url(allowed / "sub"), "image", local)
    with pytest.raises(MediaError, match="remote host"):
        fetch_bytes("file://otherhost" + str(allowed / "red image.png"), "image", local)
    with pytest.raises(MediaError, match="larger than") as info:
        fetch_bytes(
            file_url(allowed / "red image.png"),
            "image",
            policy(allowed_local_media_path=str(allowed), max_download_bytes=10),
        )
    assert info.value.status == 413


def test_file_urls_disabled_by_default(media_dirs):
    allowed, _ = media_dirs
    with pytest.raises(MediaError, match="file:// URLs are disabled") as info:
        fetch_bytes(file_url(allowed / "red image.png"), "image", policy())
    assert info.value.status == 403


# ---------------------------------------------------------------------------------------
# Images


def test_pixel_cap_checked_from_header():
    # 10000 x 10000 = 100 Mpx: over our 64 Mi cap, under Pillow's own error threshold.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning
        with pytest.raises(MediaError, match="10000x10000") as info:
            load_image(png_header(10_000, 10_000), policy())
    assert info.value.status == 413
    # Far past Pillow's threshold: its DecompressionBombError is mapped too.
    with pytest.raises(MediaError, match="too large") as info:
        load_image(png_header(100_000, 100_000), policy())
    assert info.value.status == 413
    with pytest.raises(MediaError, match="more than the 40 allowed"):
        load_image(RED_PNG, policy(max_image_pixels=40))
    with pytest.raises(MediaError, match="more than"):
        load_image(Image.new("RGB", (20, 20)), policy(max_image_pixels=100))


def test_image_formats_allowlist():
    image = Image.new("RGB", (8, 8), (0, 255, 0))
    for fmt in ("ICO", "PPM", "PDF"):
        with pytest.raises(MediaError, match=f"image format {fmt} is not allowed"):
            load_image(encode(image, fmt), policy())
    jpeg = encode(image, "JPEG")
    assert load_image(jpeg, policy()).size == (8, 8)
    with pytest.raises(MediaError, match="JPEG is not allowed"):
        load_image(jpeg, policy(image_formats=("PNG",)))
    for fmt in ("WEBP", "GIF", "BMP", "TIFF"):
        assert load_image(encode(image, fmt), policy()).getpixel((0, 0))[1] > 200


def test_rgba_composited_on_background():
    white = load_image(RGBA_PNG, policy())
    assert white.mode == "RGB"
    assert white.getpixel((0, 0)) == (255, 255, 255)
    assert white.getpixel((0, 1)) == (0, 0, 255)
    red = white.getpixel((0, 2))
    assert red[0] == 255 and abs(red[1] - 127) <= 1 and abs(red[2] - 127) <= 1
    black = load_image(RGBA_PNG, policy(), rgba_background_color=(0, 0, 0))
    assert black.getpixel((0, 0)) == (0, 0, 0)
    assert abs(black.getpixel((0, 2))[0] - 128) <= 1
    # The same for a PIL image, an LA image and a palette image with a transparent index.
    assert load_image(rgba_image(), policy(), (10, 20, 30)).getpixel((0, 0)) == (10, 20, 30)
    la = Image.new("LA", (2, 2), (0, 0))
    assert load_image(png_bytes(la), policy()).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0
    loaded = load_image(encode(palette, "PNG", transparency=0), policy(), (0, 0, 255))
    assert loaded.getpixel((0, 0)) == (0, 0, 255) and loaded.getpixel((1, 1)) == (255, 0, 0)
    with pytest.raises(ValueError, match="rgba_background_color"):
        load_image(RGBA_PNG, policy(), rgba_background_color=(0, 0))


def test_rgba_over_http(server):
    image = load_image(f"{server}/rgba.png", policy(allowed_media_domains=LOCAL), (0, 0, 0))
    assert image.getpixel((0, 0)) == (0, 0, 0)


def test_garbage_and_truncated_images():
    with pytest.raises(MediaError, match="could not identify"):
        load_image(b"\x00garbage" * 10, policy())
    big = png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(MediaError, match="truncated or corrupt"):
        load_image(big[: len(big) // 2], policy())
    with pytest.raises(MediaError, match="URL, bytes or PIL"):
        load_image(12345, policy())


# ---------------------------------------------------------------------------------------
# Video


def test_video_round_trip():
    video, meta = load_video_with_metadata(VIDEO, policy())
    assert video.shape == (10, 32, 48, 3) and video.dtype == np.uint8
    colors = frame_colors(video)
    expected = np.array([[25 * i, 255 - 25 * i, 0] for i in range(10)])
    np.testing.assert_allclose(colors, expected, atol=6)  # RGB order, JPEG-lossy
    assert meta.total_num_frames == 10 and meta.fps == 10.0 and meta.duration_s == 1.0
    assert meta.frame_indices == tuple(range(10))


def test_video_num_frames_sampling(server):
    video, meta = load_video_with_metadata(VIDEO, policy(), num_frames=4)
    assert meta.frame_indices == (0, 3, 6, 9)
    np.testing.assert_allclose(frame_colors(video)[:, 0], [0, 75, 150, 225], atol=6)
    assert load_video(VIDEO, policy(), num_frames=50).shape[0] == 10  # all there are
    fetched = load_video(f"{server}/video.avi", policy(allowed_media_domains=LOCAL), 2)
    assert fetched.shape == (2, 32, 48, 3)
    assert sample_frame_indices(100, 5, 64) == [0, 25, 50, 74, 99]
    with pytest.raises(MediaError, match="num_frames"):
        load_video(VIDEO, policy(), num_frames=0)


def test_video_frame_and_pixel_caps():
    capped = load_video_with_metadata(VIDEO, policy(max_video_frames=5))[1]
    assert capped.frame_indices == (0, 2, 4, 7, 9)
    with pytest.raises(MediaError, match="more than the 5 frames") as info:
        load_video(VIDEO, policy(max_video_frames=5), num_frames=6)
    assert info.value.status == 413
    with pytest.raises(MediaError, match="video pixels") as info:
        load_video(VIDEO, policy(max_video_pixels=48 * 32 * 3), num_frames=4)
    assert info.value.status == 413
    with pytest.raises(MediaError, match="per frame"):
        load_video(VIDEO, policy(max_image_pixels=100))


def test_video_without_declared_frame_count(monkeypatch):
    """Containers that do not declare a count: frames are counted by reading first."""
    real = cv2.VideoCapture

    class NoCount:
        def __init__(self, *args):
            self._capture = real(*args)

        def get(self, prop):
            return 0.0 if prop == cv2.CAP_PROP_FRAME_COUNT else self._capture.get(prop)

        def __getattr__(self, name):
            return getattr(self._capture, name)

    monkeypatch.setattr(cv2, "VideoCapture", NoCount)
    video, meta = load_video_with_metadata(VIDEO, policy(), num_frames=4)
    assert meta.total_num_frames == 10 and meta.frame_indices == (0, 3, 6, 9)
    np.testing.assert_allclose(frame_colors(video)[:, 0], [0, 75, 150, 225], atol=6)


def test_animated_gif_as_video():
    frames = [Image.new("RGB", (16, 8), (60 * i, 0, 0)) for i in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    video = load_video(buf.getvalue(), policy())
    assert video.shape == (4, 8, 16, 3)
    np.testing.assert_allclose(frame_colors(video)[:, 0], [0, 60, 120, 180], atol=2)


def corrupt_frame(data: bytes, index: int) -> bytes:
    """Wipe the JPEG start of frame `index` of an MJPG AVI: that frame no longer decodes."""
    starts = [i for i in range(len(data) - 2) if data[i : i + 3] == b"\xff\xd8\xff"]
    bad = bytearray(data)
    bad[starts[index] : starts[index] + 200] = bytes(200)
    return bytes(bad)


def test_video_frame_recovery_real_corrupt_frame():
    bad = corrupt_frame(VIDEO, 5)
    video, meta = load_video_with_metadata(bad, policy())
    assert 5 not in meta.frame_indices and len(video) == 9  # dropped
    video, meta = load_video_with_metadata(bad, policy(), frame_recovery=True)
    assert len(video) == 10
    np.testing.assert_array_equal(video[5], video[6])  # replaced by the next good frame
    sampled = load_video(bad, policy(), num_frames=4, frame_recovery=True)  # wants 0,3,6,9
    assert len(sampled) == 4


class FakeCapture:
    """grab/retrieve over `n` frames (frame i is filled with i); `bad` frames fail."""

    def __init__(self, n: int, bad_grab=(), bad_retrieve=()):
        self.n, self.bad_grab, self.bad_retrieve = n, set(bad_grab), set(bad_retrieve)
        self.position = -1
        self.retrieved: list[int] = []

    def grab(self):
        self.position += 1
        return self.position < self.n and self.position not in self.bad_grab

    def retrieve(self):
        self.retrieved.append(self.position)
        if self.position in self.bad_retrieve:
            return False, None
        return True, np.full((2, 2, 3), self.position, np.uint8)


def test_read_frames_logic():
    ids = lambda frames: {k: int(v[0, 0, 0]) for k, v in frames.items()}  # noqa: E731
    capture = FakeCapture(10, bad_retrieve={3})
    assert ids(read_frames(capture, [0, 3, 6])) == {0: 0, 6: 6}
    assert capture.retrieved == [0, 3, 6]  # frames not wanted are grabbed, not decoded
    capture = FakeCapture(10, bad_retrieve={3}, bad_grab={4})
    assert ids(read_frames(capture, [0, 3, 6], frame_recovery=True)) == {0: 0, 3: 5, 6: 6}
    # Recovery looks past the last wanted frame; nothing left -> dropped.
    assert ids(read_frames(FakeCapture(10, bad_retrieve={6}), [0, 6], True)) == {0: 0, 6: 7}
    assert ids(read_frames(FakeCapture(7, bad_retrieve={6}), [0, 6], True)) == {0: 0}
    # A header that declares far more frames than the stream holds ends after a few misses.
    capture = FakeCapture(5)
    assert ids(read_frames(capture, [0, 10**9])) == {0: 0}
    assert capture.position < 40


def test_video_in_memory_inputs():
    frames = np.stack([np.full((4, 6, 3), i, np.uint8) for i in range(8)])
    assert load_video(frames, policy()) is not None
    np.testing.assert_array_equal(load_video(frames, policy()), frames)
    np.testing.assert_array_equal(load_video(frames, policy(), num_frames=2)[:, 0, 0, 0], [0, 7])
    pil = [Image.new("RGBA", (6, 4), (i, 0, 0, 255)) for i in range(3)]
    video = load_video(pil, policy())
    assert video.shape == (3, 4, 6, 3) and video[2, 0, 0].tolist() == [2, 0, 0]
    mixed = [np.zeros((4, 6), np.uint8), np.zeros((4, 6, 4), np.uint8), Image.new("L", (6, 4))]
    assert load_video(mixed, policy()).shape == (3, 4, 6, 3)
    with pytest.raises(MediaError, match="differ in size"):
        load_video([np.zeros((4, 6, 3), np.uint8), np.zeros((5, 6, 3), np.uint8)], policy())
    with pytest.raises(MediaError, match="uint8"):
        load_video(frames.astype(np.float32), policy())
    with pytest.raises(MediaError, match=r"\(T, H, W, 3\)"):
        load_video(frames[0], policy())
    with pytest.raises(MediaError, match="no frames"):
        load_video([], policy())
    assert load_video(frames, policy(max_video_frames=4)).shape[0] == 4


def test_garbage_videos():
    with pytest.raises(MediaError, match="could not identify the video container"):
        load_video(b"\x00garbage" * 100, policy())
    # Playlists make FFmpeg open other files or URLs: never handed to it.
    with pytest.raises(MediaError, match="could not identify"):
        load_video(b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n", policy())
    with pytest.raises(MediaError, match="AVI is not allowed"):
        load_video(VIDEO, policy(video_containers=("MP4",)))
    with pytest.raises(MediaError, match="video"):
        load_video(VIDEO[:64] + b"\x00" * 512, policy())


# ---------------------------------------------------------------------------------------
# Audio


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(int(seconds * rate), np.int16).tobytes())
    return buf.getvalue()


def test_load_audio():
    pytest.importorskip("soundfile")
    samples, rate = load_audio(wav_bytes(0.5), policy())
    assert rate == 8000 and samples.shape == (4000,)
    url = "data:audio/wav;base64," + base64.b64encode(wav_bytes(0.25)).decode()
    assert load_audio(url, policy())[0].shape == (2000,)
    with pytest.raises(MediaError, match="s long") as info:
        load_audio(wav_bytes(2.0), policy(max_audio_duration_s=1.0))
    assert info.value.status == 413


def test_load_audio_garbage(monkeypatch):
    from jaxmm.multimodal import audio

    def refuse(data, max_duration_s=None):
        raise ValueError("could not decode audio data: nope")

    monkeypatch.setattr(audio, "decode_audio_bytes", refuse)
    with pytest.raises(MediaError, match="could not decode the audio") as info:
        load_audio(b"\x00" * 100, policy())
    assert info.value.status == 400
