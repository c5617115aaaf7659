"""Fuzz: hypothesis-generated JSON bodies (and some non-JSON) against /v1/chat/completions,
/v1/completions and /v1/embeddings of a real uvicorn over the tiny Llama. Proves: never a
5xx (status line or an error event inside a stream), errors always in OpenAI shape, and the
engine ends clean.

The routes parse their bodies by hand (so a bad body is a 400, never FastAPI's 422), so the
OpenAPI schema carries no body schema: the routes come from `app.openapi()`, the field
names and types from the pydantic request models behind them."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxmm.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from tests.helpers import make_checkpoint
from tests.server.live_util import KEY, NAME, live_server, wait_clean

ENGINE_KW = dict(
    max_model_len=48,
    max_num_seqs=32,
    max_num_batched_tokens=128,
    kv_cache_memory_bytes=1 << 22,
)
ROUTES = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}
MAX_EXAMPLES = 150

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
any_json = st.recursive(
    json_leaf,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
small_int = st.integers(min_value=-3, max_value=300) | st.sampled_from([0, 10**12, -(2**63)])
roles = st.sampled_from(["user", "assistant", "system", "tool", "developer", "", "x"])
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)}),
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["image_url", "video_url", "audio_url", "input_audio"]),
            "image_url": st.fixed_dictionaries(
                {
                    "url": st.sampled_from(
                        [
                            "data:image/png;base64,AAAA",
                            "file:///etc/passwd",
                            "http://127.0.0.1:9/x.png",
                            "ftp://x/y",
                        ]
                    )
                }
            ),
        }
    ),
    st.dictionaries(st.text(max_size=8), any_json, max_size=3),
)
message = st.fixed_dictionaries(
    {"role": roles},
    optional={
        "content": st.text(max_size=60) | st.lists(part, max_size=3) | any_json,
        "name": st.text(max_size=8),
    },
)
FIELD_VALUES = {
    "model": st.sampled_from([NAME, None, "", "gpt-4o"]) | st.text(max_size=10),
    "messages": st.lists(message, max_size=3) | any_json,
    "prompt": st.text(max_size=60)
    | st.lists(st.integers(-5, 300), max_size=20)
    | st.lists(st.text(max_size=20), max_size=3)
    | st.lists(st.lists(st.integers(-5, 300), max_size=8), max_size=3)
    | any_json,
    "input": st.text(max_size=30) | any_json,
    "n": small_int | any_json,
    "max_tokens": small_int | any_json,
    "max_completion_tokens": small_int | any_json,
    "top_logprobs": small_int | any_json,
    "logprobs": st.booleans() | small_int | any_json,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5) | any_json,
    "stop_token_ids": st.lists(small_int, max_size=5) | any_json,
    "stream": st.booleans() | any_json,
    "stream_options": st.fixed_dictionaries(
        {"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}
    )
    | any_json,
}


def field_strategy(name: str):
    if name in FIELD_VALUES:
        return FIELD_VALUES[name]
    return st.floats(allow_nan=False) | small_int | st.booleans() | any_json


@st.composite
def request_body(draw):
    path = draw(st.sampled_from(sorted(ROUTES)))
    fields = sorted(ROUTES[path].model_fields)
    chosen = draw(st.lists(st.sampled_from(fields), max_size=8, unique=True))
    required = [f for f, info in ROUTES[path].model_fields.items() if info.is_required()]
    if draw(st.booleans()):
        chosen = sorted(set(chosen) | set(required))
    body = {f: draw(field_strategy(f)) for f in chosen}
    # keep each request cheap: a generated max_tokens stays, but n is usually small
    if isinstance(body.get("n"), int) and body["n"] > 8 and draw(st.booleans()):
        body["n"] = 2
    raw = draw(st.sampled_from(["json", "json", "json", "json", "mangled"]))
    data = json.dumps(body).encode()
    if raw == "mangled":
        cut = draw(st.integers(0, max(0, len(data) - 1)))
        data = data[:cut] + draw(st.binary(max_size=8))
    return path, data


@pytest.fixture(scope="module")
def live(ckpt_root):
    with live_server(make_checkpoint(ckpt_root, "llama"), **ENGINE_KW) as x:
        yield x


def test_schema_routes_are_the_fuzzed_ones(live):
    engine, url = live
    spec = httpx.get(url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    posts = {p for p, ops in spec["paths"].items() if "post" in ops}
    assert set(ROUTES) <= posts


def test_fuzz_no_5xx(live):
    engine, url = live
    client = httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx.Timeout(30.0)
    )
    seen: dict[int, int] = {}
    t0 = time.monotonic()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(request_body())
    def check(req):
        path, data = req
        with client.stream(
            "POST", path, content=data, headers={"Content-Type": "application/json"}
        ) as r:
            body = r.read()
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (path, data[:300], body[:300])
        if r.status_code >= 400:
            err = json.loads(body)["error"]
            assert set(err) == {"message", "type", "param", "code"}
        elif r.headers.get("content-type", "").startswith("text/event-stream"):
            text = body.decode()
            assert text.endswith("data: [DONE]\n\n")
            for line in text.splitlines():
                if line.startswith("data: {") and '"error"' in line:
                    err = json.loads(line[6:])["error"]
                    # a client's fault, not the server's
                    assert err["type"] not in ("internal_server_error", "service_unavailable_error")

    try:
        check()
    finally:
        client.close()
    print("fuzz statuses:", dict(sorted(seen.items())))
    assert time.monotonic() - t0 < 90
    assert seen.get(200, 0) > 0 and sum(v for k, v in seen.items() if k >= 400) > 0, seen
    assert httpx.get(url + "/health").status_code == 200
    wait_clean(engine)
