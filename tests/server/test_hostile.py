"""Hostile inputs against a real uvicorn over the tiny Llama: each case asserts the exact
status code, that /health stays 200 afterwards, and that the server process did not grow
by more than a bounded amount of memory. docs/security.md lists every case."""

from __future__ import annotations

import json
import os
import resource
import socket
import sys

import httpx
import pytest

from tests.helpers import make_checkpoint
from tests.server.live_util import KEY, NAME, live_server, wait_clean

ENGINE_KW = dict(
    max_model_len=128,
    max_num_seqs=16,
    max_num_batched_tokens=128,
    kv_cache_memory_bytes=1 << 22,
)
MAX_BODY = 256 * 1024
AUTH = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "Hello"}]
CHAT = "/v1/chat/completions"
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
CMPL = "/v1/completions"


@pytest.fixture(scope="module")
def live(ckpt_root):
    path = make_checkpoint(ckpt_root, "llama")
    with live_server(path, app_kw=dict(max_body_bytes=MAX_BODY), **ENGINE_KW) as x:
        yield x


def chat(**fields):
    return {"model": NAME, "messages": MSG, "max_tokens": 2, **fields}


def cmpl(**fields):
    return {"model": NAME, "prompt": "Hello", "max_tokens": 2, **fields}


def image_part(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


def anyof_blowup() -> dict:
    """120 alternatives of up to 120 properties (200 kB): over the grammar size limit."""
    alternatives = [
        {"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(j + 1)}}
        for j in range(120)
    ]
    return {"anyOf": alternatives}


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def nested(depth: int) -> bytes:
    return b'{"model": "tiny", "messages": ' + b"[" * depth + b"]" * depth + b"}"


# (id, method, path, json body | raw bytes, extra headers, expected status)
CASES = [
    # -- body / framing ------------------------------------------------------------------
    ("bad-json", "POST", CHAT, b'{"messages": [', {}, 400),
    ("json-array-body", "POST", CHAT, b"[1, 2, 3]", {}, 400),
    ("empty-body", "POST", CHAT, b"", {}, 400),
    ("non-utf8-body", "POST", CHAT, b'{"x": "\xff\xfe"}', {}, 400),
    ("deeply-nested-json", "POST", CHAT, nested(100_000), {}, 400),
    (
        "nan-temperature",
        "POST",
        CHAT,
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": NaN}',
        {},
        400,
    ),
    (
        "infinite-repetition-penalty",
        "POST",
        CMPL,
        b'{"prompt": "hi", "max_tokens": 2, "repetition_penalty": Infinity}',
        {},
        400,
    ),
    (
        "wrong-content-type",
        "POST",
        CMPL,
        json.dumps(cmpl()).encode(),
        {"Content-Type": "text/plain"},
        200,
    ),
    (
        "body-over-cap",
        "POST",
        CMPL,
        json.dumps(cmpl(prompt="x" * (MAX_BODY + 1))).encode(),
        {},
        413,
    ),
    ("bad-content-length", "POST", CMPL, None, {"Content-Length": "abc"}, 400),
    ("wrong-field-type", "POST", CHAT, chat(n="two"), {}, 400),
    # -- sampling params -----------------------------------------------------------------
    ("huge-n", "POST", CHAT, chat(n=10**9), {}, 400),
    ("n-129", "POST", CMPL, cmpl(n=129), {}, 400),
    ("huge-max-tokens", "POST", CHAT, chat(max_tokens=10**12), {}, 400),
    ("negative-max-tokens", "POST", CMPL, cmpl(max_tokens=-1), {}, 400),
    ("huge-top-logprobs", "POST", CHAT, chat(logprobs=True, top_logprobs=10**6), {}, 400),
    ("huge-completion-logprobs", "POST", CMPL, cmpl(logprobs=10**6), {}, 400),
    ("negative-temperature", "POST", CHAT, chat(temperature=-1), {}, 400),
    ("top-p-above-1", "POST", CHAT, chat(top_p=2.0), {}, 400),
    ("top-k-negative", "POST", CMPL, cmpl(top_k=-5), {}, 400),
    ("huge-seed", "POST", CMPL, cmpl(seed=2**80, temperature=1.0), {}, 200),
    ("negative-seed", "POST", CMPL, cmpl(seed=-(2**70), temperature=1.0), {}, 200),
    ("min-tokens-over-max", "POST", CMPL, cmpl(min_tokens=10, max_tokens=2), {}, 400),
    ("stop-list-10k", "POST", CMPL, cmpl(stop=[f"s{i}" for i in range(10_000)]), {}, 200),
    ("stop-string-100k", "POST", CMPL, cmpl(stop="z" * 100_000), {}, 200),
    ("empty-stop-string", "POST", CMPL, cmpl(stop=[""]), {}, 400),
    ("stop-token-ids-out-of-vocab", "POST", CMPL, cmpl(stop_token_ids=[10**12]), {}, 200),
    ("stop-token-ids-negative", "POST", CMPL, cmpl(stop_token_ids=[-1]), {}, 400),
    ("logit-bias", "POST", CHAT, chat(logit_bias={"1": 100}), {}, 200),
    ("logit-bias-out-of-range", "POST", CHAT, chat(logit_bias={"1": 1e30}), {}, 400),
    ("logit-bias-nan-key", "POST", CHAT, chat(logit_bias={"NaN": 1}), {}, 400),
    ("logit-bias-out-of-vocab", "POST", CHAT, chat(logit_bias={str(10**12): 1}), {}, 400),
    (
        "logit-bias-10k-entries",
        "POST",
        CMPL,
        cmpl(logit_bias={str(i): 1 for i in range(10_000)}),
        {},
        400,
    ),
    ("prompt-logprobs-huge", "POST", CMPL, cmpl(prompt_logprobs=10**6), {}, 400),
    ("prompt-logprobs-negative", "POST", CMPL, cmpl(prompt_logprobs=-1), {}, 400),
    ("best-of", "POST", CMPL, cmpl(best_of=5), {}, 400),
    (
        "response-format-json-schema",
        "POST",
        CHAT,
        chat(response_format={"type": "json_schema"}),
        {},
        400,
    ),
    # -- structured outputs: a 400 in bounded time, never a stuck engine ------------------
    ("so-invalid-regex", "POST", CMPL, cmpl(structured_outputs={"regex": "(ab"}), {}, 400),
    ("so-two-kinds", "POST", CMPL, cmpl(structured_outputs={"regex": "a", "json": {}}), {}, 400),
    (
        "so-unknown-grammar-rule",
        "POST",
        CHAT,
        chat(structured_outputs={"grammar": "start: x"}),
        {},
        400,
    ),
    ("so-choice-not-list", "POST", CHAT, chat(structured_outputs={"choice": "abc"}), {}, 400),
    (
        "so-schema-nested-300",
        "POST",
        CHAT,
        # as bytes: too deep for the test client's own JSON encoder
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
        + b'"structured_outputs": {"json": '
        + b'{"type": "object", "properties": {"a": ' * 300
        + b'{"type": "string"}'
        + b"}}" * 300
        + b"}}",
        {},
        400,
    ),
    (
        "so-schema-enum-20k",  # over the lexer's size limit
        "POST",
        CHAT,
        chat(response_format=json_schema({"enum": list(range(20_000))})),
        {},
        400,
    ),
    (
        "so-schema-anyof-blowup",
        "POST",
        CHAT,
        chat(response_format=json_schema(anyof_blowup())),
        {},
        400,
    ),
    (
        "so-regex-repeat-blowup",
        "POST",
        CMPL,
        cmpl(structured_outputs={"regex": "(a{1,999}){1,999}"}),
        {},
        200,
    ),
    ("response-format-unknown", "POST", CHAT, chat(response_format={"type": "xml"}), {}, 400),
    (
        "response-format-schema-not-object",
        "POST",
        CHAT,
        chat(response_format={"type": "json_schema", "json_schema": {"schema": 5}}),
        {},
        400,
    ),
    # -- prompts / token ids -------------------------------------------------------------
    ("token-id-out-of-vocab", "POST", CMPL, cmpl(prompt=[10**9]), {}, 400),
    ("token-id-negative", "POST", CMPL, cmpl(prompt=[[-5, 3]]), {}, 400),
    ("token-ids-over-context", "POST", CMPL, cmpl(prompt=[3] * 5000), {}, 400),
    ("empty-prompt-list", "POST", CMPL, cmpl(prompt=[]), {}, 400),
    ("prompt-mixed-types", "POST", CMPL, cmpl(prompt=[1, "a", None]), {}, 400),
    ("echo-with-logprobs", "POST", CMPL, cmpl(echo=True, logprobs=1), {}, 200),
    ("suffix", "POST", CMPL, cmpl(suffix="tail"), {}, 400),
    ("lone-surrogate-text", "POST", CMPL, b'{"prompt": "a\\ud800b", "max_tokens": 2}', {}, 400),
    ("nul-bytes-text", "POST", CMPL, cmpl(prompt="a\x00b\x00"), {}, 200),
    (
        "special-token-text",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": "<|end|><|assistant|></s><s>"}]),
        {},
        200,
    ),
    # -- chat messages / templates -------------------------------------------------------
    ("empty-messages", "POST", CHAT, chat(messages=[]), {}, 400),
    ("message-without-role", "POST", CHAT, chat(messages=[{"content": "hi"}]), {}, 400),
    ("message-content-int", "POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), {}, 200),
    (
        "request-chat-template",
        "POST",
        CHAT,
        chat(chat_template="{{ ''.__class__.__mro__ }}"),
        {},
        400,
    ),
    (
        "template-kwargs-override",
        "POST",
        CHAT,
        chat(chat_template_kwargs={"chat_template": "{{ 7 * 7 }}"}),
        {},
        400,
    ),
    (
        "template-kwargs-tokenize",
        "POST",
        CHAT,
        chat(chat_template_kwargs={"tokenize": True}),
        {},
        400,
    ),
    ("tool-choice-required", "POST", CHAT, chat(tool_choice="required"), {}, 400),
    (
        "tool-choice-auto-without-flags",
        "POST",
        CHAT,
        chat(tools=TOOLS, tool_choice="auto"),
        {},
        400,
    ),
    (
        "tool-choice-unknown-function",
        "POST",
        CHAT,
        chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "rm"}}),
        {},
        400,
    ),
    ("tools-not-functions", "POST", CHAT, chat(tools=[{"type": "shell"}]), {}, 400),
    (
        "tools-schema-not-object",
        "POST",
        CHAT,
        chat(tools=[{"function": {"name": "f", "parameters": 5}}]),
        {},
        400,
    ),
    (
        "tool-call-arguments-not-json",
        "POST",
        CHAT,
        chat(
            messages=MSG
            + [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{{"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c", "content": "x"},
            ]
        ),
        {},
        200,
    ),
    # -- media -------------------------------------------------------------------------
    (
        "image-for-text-model",
        "POST",
        CHAT,
        chat(messages=image_part("data:image/png;base64,iVBORw0KGgo=")),
        {},
        400,
    ),
    (
        "image-file-url-text-model",
        "POST",
        CHAT,
        chat(messages=image_part("file:///etc/passwd")),
        {},
        400,
    ),
    (
        "unknown-part-type",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "exploit", "x": 1}]}]),
        {},
        400,
    ),
    (
        "embeddings-on-generative-model",
        "POST",
        "/v1/embeddings",
        {"model": NAME, "input": ["a" * 1000] * 50},
        {},
        400,
    ),
    ("transcription-not-multipart", "POST", "/v1/audio/transcriptions", {"file": "x"}, {}, 400),
    # -- model / routes / methods --------------------------------------------------------
    ("unknown-model", "POST", CHAT, chat(model="gpt-4o"), {}, 404),
    ("huge-model-name", "POST", CHAT, chat(model="m" * 100_000), {}, 404),
    ("get-on-post-route", "GET", CHAT, None, {}, 405),
    ("unknown-route", "GET", "/v1/admin", None, {}, 404),
    ("double-slash-route", "POST", "/v1//chat/completions", chat(), {}, 404),
    # -- auth ----------------------------------------------------------------------------
    ("no-api-key", "POST", CHAT, chat(), {"Authorization": None}, 401),
    ("wrong-api-key", "POST", CHAT, chat(), {"Authorization": "Bearer sk-wrong"}, 401),
    ("basic-auth-scheme", "POST", CHAT, chat(), {"Authorization": f"Basic {KEY}"}, 401),
    ("key-prefix-only", "POST", CHAT, chat(), {"Authorization": f"Bearer {KEY[:-1]}"}, 401),
    ("key-with-suffix", "POST", CHAT, chat(), {"Authorization": f"Bearer {KEY}x"}, 401),
    ("unknown-route-without-key", "GET", "/v1/admin", None, {"Authorization": None}, 401),
]


def _raw_status(url: str, request: bytes) -> int:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def _rss_mb(engine) -> float:
    """Peak RSS (MB) of this process (server + test client), plus the engine process's when
    the engine runs in one."""
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024
    mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / scale / (1024 * 1024)
    pid = getattr(getattr(engine, "client", None), "pid", None)
    if pid is not None and os.path.exists(f"/proc/{pid}/status"):
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    mb += int(line.split()[1]) / 1024
    return mb


def _check_after(engine, url: str, rss_before: float) -> None:
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    wait_clean(engine)
    # peak RSS (server, engine, test client) grew by a bounded amount
    assert _rss_mb(engine) - rss_before < 256


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile(live, case):
    engine, url = live
    _, method, path, body, headers, want = case
    rss = _rss_mb(engine)
    hdrs = dict(AUTH)
    hdrs.update(headers)
    if hdrs.get("Authorization") is None:
        hdrs.pop("Authorization")
    if body is None and "Content-Length" in headers:
        req = (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {headers['Content-Length']}\r\n\r\n"
        ).encode()
        assert _raw_status(url, req) == want
        _check_after(engine, url, rss)
        return
    kw: dict = {"headers": hdrs, "timeout": 60}
    if isinstance(body, bytes):
        kw["content"] = body
        kw["headers"].setdefault("Content-Type", "application/json")
    elif body is not None:
        kw["json"] = body
    r = httpx.request(method, url + path, **kw)
    assert r.status_code == want, r.text[:500]
    if r.status_code >= 400 and r.status_code != 405:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert "Traceback" not in err["message"]
        assert len(err["message"]) < 2000  # errors never echo a whole payload
    _check_after(engine, url, rss)


RAW_PATHS = [
    # (id, request line path, expected status without a key)
    ("dot-segments-to-protected", "/health/../v1/models", 401),
    ("encoded-dot-segments", "/health/%2e%2e/v1/models", 401),
    ("semicolon-path", "/health;/v1/models", 401),
    ("query-names-open-path", "/v1/models?/health", 401),
    ("absolute-form-target", "http://evil.example/v1/models", 401),
]


@pytest.mark.parametrize("case", RAW_PATHS, ids=[c[0] for c in RAW_PATHS])
def test_path_tricks_do_not_bypass_auth(live, case):
    engine, url = live
    _, path, want = case
    rss = _rss_mb(engine)
    req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    assert _raw_status(url, req) == want
    _check_after(engine, url, rss)


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer " + "k" * (1 << 20)},  # one 1 MiB header
        {f"X-Pad-{i}": "v" for i in range(500)},  # 500 small ones
        {"X-Pad": "v" * 40_000},  # over 32 KiB, with a valid key
    ],
    ids=["1mib-header", "500-headers", "40kib-header"],
)
def test_oversized_headers_get_431(live, headers):
    engine, url = live
    rss = _rss_mb(engine)
    hdrs = {**AUTH, **headers}
    r = httpx.post(url + CHAT, json=chat(), headers=hdrs, timeout=30)
    assert r.status_code == 431
    assert r.json()["error"]["type"] == "invalid_request_error"
    _check_after(engine, url, rss)
