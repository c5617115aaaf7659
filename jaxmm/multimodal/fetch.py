"""Fetching media bytes for a request: one gate for the offline API and the server alike.

Plain Python (httpx, stdlib); no JAX. Closed by default: a `MediaPolicy()` accepts only
`data:` URLs and public `http(s)://` hosts; local files and private networks must be
opened explicitly. The path of one URL through `fetch_bytes`:

1. The scheme picks the reader; anything but `http`, `https`, `data` and `file` is refused.
2. `data:` -> `parse_data_url` -> `decode_base64_payload` (also used directly by the server
   for `input_audio` and `image_embeds` parts). The decoded size is checked against the
   byte cap *before* decoding.
3. `file://` -> only when `allowed_local_media_path` is set, and only for regular files whose
   real path (symlinks resolved) lies under it. The check is repeated on the opened file
   descriptor, so swapping a symlink in between the check and the open does not escape.
4. `http(s)://` -> the host must match `allowed_media_domains` (when set); its addresses are
   resolved once and every one must be public (not loopback, private, link-local, multicast,
   reserved, unspecified, shared/CGNAT), unless the host is listed *exactly* in
   `allowed_media_domains`. Cloud metadata addresses are refused even then. The request then
   goes to the checked address itself (URL host replaced by the IP, `Host` header and TLS SNI
   set to the name, so the certificate is still verified against the name): a DNS answer
   that changes between the check and the connect (rebinding) is never used. Redirects are
   followed only with `allow_redirects`, at most `MAX_REDIRECTS` hops, each hop checked
   again from step 1 (so a redirect to `file://` or to a private host is refused). The body
   is streamed and the byte cap enforced while reading; one deadline (per media kind) covers
   name resolution, every hop and the whole body.

Every failure raises `MediaError`, whose message is safe to show a client: it names the
problem, never echoes payloads or file contents, and names the class of a refused address
(e.g. "loopback"), not the address a name resolved to.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import ipaddress
import mimetypes
import os
import re
import socket
import stat
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Literal

import httpx

MediaKind = Literal["image", "video", "audio"]
MEDIA_KINDS = ("image", "video", "audio")

MAX_REDIRECTS = 5
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "jaxmm-media-fetch"

DEFAULT_MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
# 64 Mi pixels: below Pillow's own bomb threshold (~89.5 Mpx warns, 2x that raises), so our
# check, made from the header, is the one that fires.
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024
DEFAULT_MAX_VIDEO_FRAMES = 256
# frames x height x width of the decoded output: 256 frames of 1080p fit (~1.6 GB as uint8).
DEFAULT_MAX_VIDEO_PIXELS = 512 * 1024 * 1024
DEFAULT_MAX_AUDIO_DURATION_S = 600.0

# Always refused, even for a host listed in allowed_media_domains: no media lives there, and
# a credentials endpoint is the classic SSRF prize.
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle
        "169.254.170.2",  # AWS ECS task credentials
        "169.254.169.253",  # AWS DNS
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::253",
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class MediaError(ValueError):
    """A media input was refused or could not be read.

    `status` is the HTTP status the server should answer with: 400 (bad input), 413 (over a
    size cap) or 403 (refused by policy; the server may map it to 400). The message is safe
    to show a client.
    """

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # its status survives a pipe to the server process
        return (type(self), (str(self), self.status))

    @property
    def message(self) -> str:
        return str(self)


# ---------------------------------------------------------------------------------------
# Policy


# vLLM's names of the same settings, read when the JAXMM_* one is unset (JAXMM_* wins)
VLLM_ENV_ALIASES = {
    "JAXMM_IMAGE_FETCH_TIMEOUT": "VLLM_IMAGE_FETCH_TIMEOUT",
    "JAXMM_VIDEO_FETCH_TIMEOUT": "VLLM_VIDEO_FETCH_TIMEOUT",
    "JAXMM_AUDIO_FETCH_TIMEOUT": "VLLM_AUDIO_FETCH_TIMEOUT",
    "JAXMM_MEDIA_URL_ALLOW_REDIRECTS": "VLLM_MEDIA_URL_ALLOW_REDIRECTS",
}


def _env(name: str) -> tuple[str, str | None]:
    """(the variable read, its value): `name`, else its vLLM alias when `name` is unset."""
    raw = os.environ.get(name)
    alias = VLLM_ENV_ALIASES.get(name)
    if (raw is None or raw.strip() == "") and alias is not None and alias in os.environ:
        return alias, os.environ[alias]
    return name, raw


def _env_float(name: str, default: float) -> float:
    name, raw = _env(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _env_bool(name: str, default: bool = False) -> bool:
    name, raw = _env(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name}={raw!r} is not a boolean (use 1 or 0)")


def _normalize_host(host: str) -> str:
    host = host.strip().lower().strip("[]").rstrip(".")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")  # match the punycode a URL carries
        except UnicodeError:
            raise ValueError(f"invalid host name {host!r}") from None
    return host


@dataclass(frozen=True)
class MediaPolicy:
    """What media a request may reach and how much of it may be read.

    Numeric fields and `allow_redirects` default to their environment variable (read when
    the policy is built), else to the constant named in parentheses:
    JAXMM_MEDIA_URL_ALLOW_REDIRECTS (False), JAXMM_IMAGE_FETCH_TIMEOUT (5 s),
    JAXMM_VIDEO_FETCH_TIMEOUT (30 s), JAXMM_AUDIO_FETCH_TIMEOUT (10 s) (these four also as
    vLLM's VLLM_* names, read when the JAXMM_* one is unset), JAXMM_MAX_MEDIA_BYTES
    (64 MiB), JAXMM_MAX_IMAGE_PIXELS (64 Mi), JAXMM_MAX_VIDEO_FRAMES (256),
    JAXMM_MAX_VIDEO_PIXELS (512 Mi), JAXMM_MAX_AUDIO_DURATION_S (600 s).
    `from_env` also reads the two access fields (JAXMM_ALLOWED_LOCAL_MEDIA_PATH,
    JAXMM_ALLOWED_MEDIA_DOMAINS as a comma-separated list).
    """

    # file:// only for real paths under this directory; None refuses file://.
    allowed_local_media_path: str | None = None
    # http(s) only to these hosts or their subdomains; None allows any public host. A host
    # listed exactly may also resolve to a private/loopback address.
    allowed_media_domains: tuple[str, ...] | None = None
    allow_redirects: bool = field(
        default_factory=lambda: _env_bool("JAXMM_MEDIA_URL_ALLOW_REDIRECTS")
    )
    image_timeout_s: float = field(
        default_factory=lambda: _env_float("JAXMM_IMAGE_FETCH_TIMEOUT", 5.0)
    )
    video_timeout_s: float = field(
        default_factory=lambda: _env_float("JAXMM_VIDEO_FETCH_TIMEOUT", 30.0)
    )
    audio_timeout_s: float = field(
        default_factory=lambda: _env_float("JAXMM_AUDIO_FETCH_TIMEOUT", 10.0)
    )
    max_download_bytes: int = field(
        default_factory=lambda: _env_int("JAXMM_MAX_MEDIA_BYTES", DEFAULT_MAX_DOWNLOAD_BYTES)
    )
    max_image_pixels: int = field(
        default_factory=lambda: _env_int("JAXMM_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)
    )
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
    max_video_frames: int = field(
        default_factory=lambda: _env_int("JAXMM_MAX_VIDEO_FRAMES", DEFAULT_MAX_VIDEO_FRAMES)
    )
    max_video_pixels: int = field(
        default_factory=lambda: _env_int("JAXMM_MAX_VIDEO_PIXELS", DEFAULT_MAX_VIDEO_PIXELS)
    )
    # Containers recognised by their magic bytes before FFmpeg sees the file; text formats
    # that make FFmpeg open other files or URLs (HLS playlists, concat scripts, SDP) never
    # match. Names: MP4 (MP4/MOV/3GP), AVI, MATROSKA (MKV/WebM), MPEG-TS, MPEG-PS, FLV, OGG, GIF.
    video_containers: tuple[str, ...] = (
        "MP4",
        "AVI",
        "MATROSKA",
        "MPEG-TS",
        "MPEG-PS",
        "FLV",
        "OGG",
        "GIF",
    )
    max_audio_duration_s: float = field(
        default_factory=lambda: _env_float(
            "JAXMM_MAX_AUDIO_DURATION_S", DEFAULT_MAX_AUDIO_DURATION_S
        )
    )

    def __post_init__(self) -> None:
        domains = self.allowed_media_domains
        if domains is not None:
            if isinstance(domains, str):
                domains = (domains,)
            domains = tuple(_normalize_host(d) for d in domains)
            if any(not d for d in domains):
                raise ValueError("allowed_media_domains has an empty entry")
            object.__setattr__(self, "allowed_media_domains", domains)
        if self.allowed_local_media_path is not None:
            path = os.fspath(self.allowed_local_media_path)
            if not os.path.isabs(path):
                raise ValueError(f"allowed_local_media_path must be absolute, got {path!r}")
            object.__setattr__(self, "allowed_local_media_path", path)
        formats = self.image_formats
        if isinstance(formats, str):
            formats = (formats,)
        object.__setattr__(self, "image_formats", tuple(f.upper() for f in formats))
        containers = self.video_containers
        if isinstance(containers, str):
            containers = (containers,)
        object.__setattr__(self, "video_containers", tuple(c.upper() for c in containers))
        for name in ("image_timeout_s", "video_timeout_s", "audio_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "max_download_bytes",
            "max_image_pixels",
            "max_video_frames",
            "max_video_pixels",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.max_audio_duration_s > 0:
            raise ValueError(
                f"max_audio_duration_s must be positive, got {self.max_audio_duration_s}"
            )

    @classmethod
    def from_env(cls, **overrides) -> MediaPolicy:
        """A policy from JAXMM_* environment variables; keyword arguments win over them."""
        values: dict = {}
        local = os.environ.get("JAXMM_ALLOWED_LOCAL_MEDIA_PATH", "").strip()
        if local:
            values["allowed_local_media_path"] = local
        domains = os.environ.get("JAXMM_ALLOWED_MEDIA_DOMAINS", "").strip()
        if domains:
            values["allowed_media_domains"] = tuple(
                d.strip() for d in domains.split(",") if d.strip()
            )
        values.update(overrides)
        return cls(**values)

    def timeout_for(self, kind: MediaKind) -> float:
        _check_kind(kind)
        return getattr(self, f"{kind}_timeout_s")


def _check_kind(kind: str) -> None:
    if kind not in MEDIA_KINDS:
        raise ValueError(f"kind must be one of {MEDIA_KINDS}, got {kind!r}")


def _short(url: str, limit: int = 80) -> str:
    """A URL fit for an error message: data: payloads are never echoed."""
    if url[:5].lower() == "data:":
        return "data: URL"
    return repr(url if len(url) <= limit else url[:limit] + "...")


def _too_large(what: str, size: int | None, cap: int) -> MediaError:
    got = f" ({size} bytes)" if size is not None else ""
    return MediaError(f"{what} is larger than the {cap} bytes allowed{got}", status=413)


# ---------------------------------------------------------------------------------------
# base64 and data: URLs

_WHITESPACE = re.compile(rb"\s+")


def decode_base64_payload(
    payload: str | bytes, *, max_bytes: int | None = None, what: str = "base64 payload"
) -> bytes:
    """Decode base64 from a client: whitespace, missing padding and the URL-safe alphabet
    are tolerated, a leading `data:...;base64,` header is dropped, anything else invalid is
    refused. The decoded size is checked against `max_bytes` before decoding."""
    if isinstance(payload, str):
        try:
            raw = payload.encode("ascii")
        except UnicodeEncodeError:
            raise MediaError(f"{what} is not valid base64 (non-ASCII characters)") from None
    elif isinstance(payload, (bytes, bytearray, memoryview)):
        raw = bytes(payload)
    else:
        raise MediaError(f"{what} must be a base64 string, got {type(payload).__name__}")
    if raw[:5].lower() == b"data:":
        header, sep, raw = raw.partition(b",")
        if not sep or not header.lower().endswith(b";base64"):
            raise MediaError(f"{what} is a data: URL without ';base64,'")
    raw = _WHITESPACE.sub(b"", raw)
    if max_bytes is not None:
        decoded_size = len(raw) * 3 // 4 - raw[-2:].count(b"=")
        if decoded_size > max_bytes:
            raise _too_large(what, decoded_size, max_bytes)
    if b"-" in raw or b"_" in raw:
        raw = raw.translate(bytes.maketrans(b"-_", b"+/"))
    if len(raw) % 4 == 1:
        raise MediaError(f"{what} is not valid base64 (truncated)")
    raw += b"=" * (-len(raw) % 4)
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{what} is not valid base64") from None
    if not data:
        raise MediaError(f"{what} is empty")
    return data


def parse_data_url(url: str, *, max_bytes: int | None = None) -> tuple[bytes, str | None]:
    """`data:[<mime>][;param=...][;base64],<data>` -> (bytes, mime or None)."""
    if url[:5].lower() != "data:":
        raise MediaError("not a data: URL")
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaError("data: URL has no ',' before its payload")
    params = [p.strip() for p in header.split(";")]
    mime = params[0].lower() if params and "/" in params[0] else None
    if params[-1].lower() == "base64":
        return decode_base64_payload(payload, max_bytes=max_bytes, what="data: URL"), mime
    if max_bytes is not None and len(payload) > 3 * max_bytes:
        raise _too_large("data: URL", None, max_bytes)
    data = urllib.parse.unquote_to_bytes(payload)
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_large("data: URL", len(data), max_bytes)
    if not data:
        raise MediaError("data: URL is empty")
    return data, mime


# ---------------------------------------------------------------------------------------
# file://


def _path_under(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def read_file_url(url: str, policy: MediaPolicy) -> tuple[bytes, str | None]:
    """Read a `file://` URL allowed by `policy.allowed_local_media_path`."""
    if policy.allowed_local_media_path is None:
        raise MediaError(
            "file:// URLs are disabled; set allowed_local_media_path "
            "(--allowed-local-media-path) to serve local media",
            status=403,
        )
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"file:// URL {_short(url)} names a remote host", status=403)
    if parts.query:
        raise MediaError(f"file:// URL {_short(url)} has a query string")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise MediaError(f"file:// URL {_short(url)} must hold an absolute path")
    root = os.path.realpath(policy.allowed_local_media_path)
    real = os.path.realpath(path)
    outside = MediaError(
        f"file:// URL {_short(url)} is outside the allowed local media directory", status=403
    )
    # Containment is decided before existence, so no file outside the root can be probed.
    if not _path_under(real, root):
        raise outside
    try:
        # O_NONBLOCK: a FIFO must not hang the open; O_NOFOLLOW: the final component was
        # resolved above, a symlink appearing there now is a race and is refused.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise MediaError(f"file:// URL {_short(url)}: no such file") from None
    except OSError:
        raise MediaError(f"file:// URL {_short(url)} could not be opened") from None
    try:
        # Re-check what was actually opened: intermediate directories may have been swapped
        # for symlinks between realpath() and open().
        fd_link = f"/proc/self/fd/{fd}"
        if os.path.exists(fd_link) and not _path_under(os.readlink(fd_link), root):
            raise outside
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(f"file:// URL {_short(url)} is not a regular file")
        cap = policy.max_download_bytes
        if info.st_size > cap:
            raise _too_large("local file", info.st_size, cap)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(cap + 1)
    finally:
        os.close(fd)
    if len(data) > cap:
        raise _too_large("local file", None, cap)
    if not data:
        raise MediaError(f"file:// URL {_short(url)} is empty")
    return data, mimetypes.guess_type(real)[0]


# ---------------------------------------------------------------------------------------
# http(s)://


def _domain_allowed(host: str, domains: tuple[str, ...]) -> bool:
    return any(host == d or host.endswith("." + d) for d in domains)


def address_category(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address must not be fetched from (e.g. "loopback"), or None if public."""
    if ip in _METADATA_ADDRESSES:
        return "cloud metadata"
    if ip.version == 6:
        # IPv6 forms that carry an IPv4 address reach that address: judge the IPv4 one.
        if ip.ipv4_mapped is not None:
            return address_category(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            return address_category(ip.sixtofour)
        if ip in _NAT64:
            return address_category(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for name in ("loopback", "unspecified", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    if not ip.is_global:  # shared (CGNAT) space, documentation ranges, ...
        return "non-public"
    return None


# getaddrinfo cannot be cancelled; a pool lets the deadline apply to it anyway (a stuck
# lookup keeps one worker until the system resolver gives up).
_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="jaxmm-dns")


def _resolve(host: str, port: int, deadline: float, kind: str, url: str) -> list:
    try:
        return [ipaddress.ip_address(host)]  # a literal needs no lookup
    except ValueError:
        pass
    future = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=max(deadline - time.monotonic(), 0.001))
    except concurrent.futures.TimeoutError:
        future.cancel()  # if still queued behind stuck lookups, never run it
        raise _timed_out(kind, url) from None
    except (OSError, UnicodeError):
        raise MediaError(f"could not resolve the host of {_short(url)}") from None
    addresses = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])  # drop an IPv6 zone id
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise MediaError(f"could not resolve the host of {_short(url)}")
    return addresses


def _timed_out(kind: str, url: str) -> MediaError:
    return MediaError(f"timed out fetching {kind} from {_short(url)}")


@dataclass(frozen=True)
class _PinnedRequest:
    url: httpx.URL  # the URL as given, for joining redirects
    pinned_url: httpx.URL  # host replaced by the checked address
    headers: dict[str, str]
    extensions: dict[str, str]


def _check_http_url(url: str, policy: MediaPolicy, deadline: float, kind: str) -> _PinnedRequest:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise MediaError(f"invalid URL {_short(url)}") from None
    if parsed.scheme not in ("http", "https"):
        raise MediaError(f"unsupported URL scheme in {_short(url)}")
    try:
        host = _normalize_host(parsed.raw_host.decode("ascii"))
    except UnicodeDecodeError:
        raise MediaError(f"invalid host in {_short(url)}") from None
    if not host:
        raise MediaError(f"URL {_short(url)} has no host")
    domains = policy.allowed_media_domains
    if domains is not None and not _domain_allowed(host, domains):
        raise MediaError(
            f"host {host!r} is not in the allowed media domains (allowed_media_domains)",
            status=403,
        )
    listed_exactly = domains is not None and host in domains
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = _resolve(host, port, deadline, kind, url)
    for ip in addresses:
        category = address_category(ip)
        if category == "cloud metadata" or (category is not None and not listed_exactly):
            hint = (
                "" if category == "cloud metadata" else "; list the host in allowed_media_domains"
            )
            raise MediaError(
                f"host {host!r} resolves to a {category} address, which is not allowed{hint}",
                status=403,
            )
    pinned = parsed.copy_with(host=str(addresses[0]))
    headers = {
        "Host": parsed.netloc.decode("ascii"),
        "User-Agent": _USER_AGENT,
        # Media is already compressed; asking for identity keeps the byte cap a cap on what
        # the server sends (httpx still decodes a gzip body sent anyway, and the cap then
        # counts decoded bytes).
        "Accept-Encoding": "identity",
    }
    extensions = {}
    if parsed.scheme == "https" and not _is_ip_literal(host):
        extensions["sni_hostname"] = host  # TLS verifies the certificate against the name
    return _PinnedRequest(parsed, pinned, headers, extensions)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _content_type(value: str | None) -> str | None:
    if not value:
        return None
    return value.split(";", 1)[0].strip().lower() or None


def _get_once(
    request: _PinnedRequest, policy: MediaPolicy, deadline: float, kind: str, url: str
) -> tuple[bytes, str | None] | str:
    """One GET: (body, content type), or the Location of a redirect."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _timed_out(kind, url)
    cap = policy.max_download_bytes
    # A fresh client per hop: a pooled connection opened for one name must not carry a
    # request for another (its TLS session was verified for the first name only).
    with httpx.Client(
        trust_env=False,  # no proxy from the environment: it would bypass the pinning
        follow_redirects=False,
        timeout=httpx.Timeout(remaining),
    ) as client:
        with client.stream(
            "GET", request.pinned_url, headers=request.headers, extensions=request.extensions
        ) as response:
            status = response.status_code
            if status in _REDIRECT_CODES:
                location = response.headers.get("location")
                if not location:
                    raise MediaError(f"{_short(url)} redirected without a Location")
                return location
            if not 200 <= status < 300:
                raise MediaError(f"fetching {kind} from {_short(url)} returned HTTP {status}")
            length = response.headers.get("content-length")
            encoding = response.headers.get("content-encoding", "identity").lower()
            if length and length.isdigit() and encoding == "identity" and int(length) > cap:
                raise _too_large(f"{kind} at {_short(url)}", int(length), cap)
            chunks, total = [], 0
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > cap:
                    raise _too_large(f"{kind} at {_short(url)}", None, cap)
                # Each socket read is bounded by the timeout; this bounds the sum of them.
                if time.monotonic() > deadline:
                    raise _timed_out(kind, url)
                chunks.append(chunk)
            return b"".join(chunks), _content_type(response.headers.get("content-type"))


def _fetch_http(url: str, kind: str, policy: MediaPolicy) -> tuple[bytes, str | None]:
    deadline = time.monotonic() + policy.timeout_for(kind)
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        if urllib.parse.urlsplit(current).scheme.lower() not in ("http", "https"):
            raise MediaError(f"redirect from {_short(url)} to a non-http(s) URL", status=403)
        request = _check_http_url(current, policy, deadline, kind)
        try:
            result = _get_once(request, policy, deadline, kind, url)
        except httpx.TimeoutException:
            raise _timed_out(kind, url) from None
        except httpx.HTTPError as exc:
            raise MediaError(
                f"could not fetch {kind} from {_short(url)} ({type(exc).__name__})"
            ) from None
        if not isinstance(result, str):
            if not result[0]:
                raise MediaError(f"{kind} at {_short(url)} is empty")
            return result
        if not policy.allow_redirects:
            raise MediaError(
                f"{_short(url)} redirects, and following redirects is disabled "
                "(JAXMM_MEDIA_URL_ALLOW_REDIRECTS=1 enables it)",
                status=403,
            )
        try:
            current = str(request.url.join(result))
        except (httpx.InvalidURL, ValueError, TypeError):
            raise MediaError(f"{_short(url)} redirected to an invalid URL") from None
    raise MediaError(f"{_short(url)} redirected more than {MAX_REDIRECTS} times")


# ---------------------------------------------------------------------------------------
# Entry point


def fetch_bytes(url: str, kind: MediaKind, policy: MediaPolicy) -> tuple[bytes, str | None]:
    """Read the bytes a media URL points to, under `policy`.

    Returns (data, media type): the response's Content-Type for http(s), the mime of a data:
    URL, a guess from the file name for file://; None when unknown.
    """
    _check_kind(kind)
    if not isinstance(url, str):
        raise MediaError(f"a media URL must be a string, got {type(url).__name__}")
    url = url.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return parse_data_url(url, max_bytes=policy.max_download_bytes)
    if scheme == "file":
        return read_file_url(url, policy)
    if scheme in ("http", "https"):
        return _fetch_http(url, kind, policy)
    if not scheme or url.startswith(("/", ".")):
        raise MediaError(
            f"{_short(url)} is not a URL; use http(s)://, data: or file:// "
            "(file:// needs allowed_local_media_path)"
        )
    raise MediaError(f"unsupported URL scheme {scheme!r}; use http(s)://, data: or file://")
