"""The server over a fake core engine (tests/server/fakes.py): fast, and every answer can be
worked out by hand. Completion j writes the alphabet from letter j on, one letter a step."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from jaxmm.engine.async_engine import AsyncEngine, EngineDeadError, EngineError
from jaxmm.outputs import CompletionOutput
from jaxmm.sampling_params import SamplingParams
from jaxmm.server.app import build_app
from jaxmm.server.streaming import DeltaTracker
from tests.server.fakes import FakeCoreEngine
from tests.server.util import running_server

KEY = "sk-fake"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def fake():
    core = FakeCoreEngine(max_model_len=64, slow_step_s=0.05)
    client = AsyncEngine(core)
    app = build_app(
        client, served_model_names=["fake", "fake-alias"], api_keys=[KEY], max_body_bytes=64 * 1024
    )
    with running_server(app) as url:
        yield core, client, url
    client.shutdown()


@pytest.fixture
def http(fake):
    with httpx.Client(base_url=fake[2], headers=AUTH, timeout=30) as c:
        yield c


def chat(content: str, **kw) -> dict:
    return {"model": "fake", "messages": [{"role": "user", "content": content}], **kw}


def sse_events(lines) -> list:
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def wait_idle(core, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while core.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not core.has_unfinished_requests()


# -- generation ----------------------------------------------------------------------------


def test_chat_plain(http):
    r = http.post("/v1/chat/completions", json=chat("hi", max_tokens=5, n=2))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["message"]["content"] for c in body["choices"]] == ["abcde", "bcdef"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    prompt_len = len("<user>hi<assistant>")  # a template adds no BOS of its own
    assert body["usage"] == {
        "prompt_tokens": prompt_len,
        "completion_tokens": 10,
        "total_tokens": prompt_len + 10,
    }
    assert body["model"] == "fake" and body["object"] == "chat.completion"


def test_stream_holds_back_stop_strings(http):
    # SLOW: one output per step, so the text arrives a letter at a time
    req = chat(
        "SLOW", max_tokens=20, stop=["def"], stream=True, stream_options={"include_usage": True}
    )
    with http.stream("POST", "/v1/chat/completions", json=req) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    # never a letter of the stop string: "d" and "e" were held back, then dropped
    assert "".join(pieces) == "abc"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])


def test_completions_prompts_n_echo(http):
    r = http.post(
        "/v1/completions",
        json={
            "model": "fake-alias",
            "prompt": [[65, 66], [67]],
            "n": 2,
            "max_tokens": 2,
            "echo": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    texts = {c["index"]: c["text"] for c in body["choices"]}
    assert texts == {0: "ABab", 1: "ABbc", 2: "Cab", 3: "Cbc"}
    assert body["usage"]["prompt_tokens"] == 3 and body["usage"]["completion_tokens"] == 8
    assert body["model"] == "fake-alias"


def test_completions_stream_logprobs(http):
    req = {"model": "fake", "prompt": "SLOW", "max_tokens": 3, "logprobs": 2, "stream": True}
    with http.stream("POST", "/v1/completions", json=req) as r:
        events = sse_events(r.iter_lines())
    chunks = [e for e in events if e != "[DONE]"]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == "abc"
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert tokens == ["a", "b", "c"] and offsets == [0, 1, 2]
    assert chunks[0]["choices"][0]["logprobs"]["top_logprobs"][0] == {"a": -0.5, "C": -2.5}


def test_delta_tracker_unit():
    dt = DeltaTracker(SamplingParams(stop=["xyz"]))
    out = CompletionOutput(0, "hello", [1, 2], None, None)
    assert dt.delta(0, out).text == "hel"  # two characters held back
    out = CompletionOutput(0, "hello w", [1, 2, 3], None, None)
    d = dt.delta(0, out)
    assert (d.text, d.token_ids) == ("lo", [3])
    out = CompletionOutput(0, "hello wo", [1, 2, 3, 4], None, None, finish_reason="stop")
    assert dt.delta(0, out).text == " wo"
    assert dt.delta(0, out) is None  # the final delta is given once


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, param, words",
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (json.dumps(chat("hi", n="two")).encode(), "n", "integer"),
        (json.dumps({"model": "fake", "messages": []}).encode(), "messages", "at least 1"),
        (json.dumps(chat("hi", temperature=-1)).encode(), "temperature", ">= 0"),
        (json.dumps(chat("hi", top_p=0)).encode(), "top_p", "(0, 1]"),
        (json.dumps(chat("hi", max_tokens=1000)).encode(), "max_tokens", "context length"),
        (json.dumps(chat("x" * 100)).encode(), "messages", "context length"),
        (
            json.dumps(chat("hi", response_format={"type": "xml"})).encode(),
            "response_format",
            "xml",
        ),
        (json.dumps(chat("hi", top_logprobs=2)).encode(), "top_logprobs", "logprobs"),
        (
            json.dumps({"model": "fake", "messages": [{"content": "no role"}]}).encode(),
            None,
            "role",
        ),
    ],
)
def test_bad_chat_requests_are_400(http, body, param, words):
    r = http.post(
        "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_bad_completion_prompt_is_400(http):
    r = http.post("/v1/completions", json={"model": "fake", "prompt": [[1, 2], "a"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = http.post("/v1/completions", json={"model": "fake", "prompt": "hi", "suffix": "!"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"


def test_unknown_model_404(http):
    r = http.post("/v1/chat/completions", json={**chat("hi"), "model": "gpt-4"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert http.get("/v1/models/gpt-4").status_code == 404
    assert http.get("/v1/models/fake").json()["id"] == "fake"


def test_api_key(fake):
    url = fake[2]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(url + path).status_code == 200


def test_body_too_large_413(http):
    big = json.dumps(chat("y" * 70_000)).encode()
    r = http.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: counted while read
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = http.post(
        "/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413


def test_unsupported_endpoints_400(http):
    r = http.post("/v1/embeddings", json={"model": "fake", "input": "hi"})
    assert r.status_code == 400 and "does not support embeddings" in r.json()["error"]["message"]
    r = http.post(
        "/v1/audio/transcriptions",
        data={"model": "fake"},
        files={"file": ("a.wav", b"RIFF....", "audio/wav")},
    )
    assert r.status_code == 400
    assert "does not support transcription" in r.json()["error"]["message"]


# -- isolation: a failing request never takes others down ----------------------------------


def test_engine_failure_fails_only_its_batch_and_server_survives(fake, http):
    core, client, url = fake
    r = http.post("/v1/chat/completions", json=chat("BOOM", max_tokens=3))
    assert r.status_code == 500
    assert "engine failed" in r.json()["error"]["message"]
    assert "Traceback" not in r.text and "kaboom" not in r.text  # internals stay in the log
    with http.stream(
        "POST", "/v1/completions", json={"model": "fake", "prompt": "BOOM", "stream": True}
    ) as r:
        events = sse_events(r.iter_lines())
    assert "error" in events[-2] and events[-1] == "[DONE]"
    assert client.is_running and http.get("/health").status_code == 200
    r = http.post("/v1/chat/completions", json=chat("fine", max_tokens=2))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ab"
    wait_idle(core)


def test_concurrent_requests_batch_and_bad_ones_stay_alone(fake):
    core, _, url = fake

    async def go():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
            good = [
                c.post("/v1/chat/completions", json=chat("SLOW", max_tokens=4 + i % 3))
                for i in range(8)
            ]
            bad = [c.post("/v1/chat/completions", json=chat("z" * 80))]
            return await asyncio.gather(*good, *bad)

    steps_before = core.num_steps
    results = asyncio.run(go())
    for i, r in enumerate(results[:8]):
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "abcdefg"[: 4 + i % 3]
    assert results[8].status_code == 400
    # batched: 8 requests of <= 6 tokens took far fewer than 8 * 6 steps
    assert core.num_steps - steps_before < 20
    wait_idle(core)


def test_stream_disconnect_aborts(fake):
    core, _, url = fake
    before = len(core.aborted)
    req = chat("SLOW", max_tokens=40, stream=True)  # 2 s of steps
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=req) as r:
            assert r.status_code == 200
            n = 0
            for line in r.iter_lines():
                n += line.startswith("data: ")
                if n == 3:
                    break
    wait_idle(core)
    assert len(core.aborted) == before + 1


def test_nonstream_disconnect_aborts(fake):
    core, _, url = fake
    before = len(core.aborted)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            url + "/v1/completions",
            headers=AUTH,
            timeout=0.4,
            json={"model": "fake", "prompt": "SLOW", "max_tokens": 40},
        )
    wait_idle(core)
    assert len(core.aborted) == before + 1


def test_add_request_errors_reach_that_request_only():
    core = FakeCoreEngine()
    client = AsyncEngine(core)

    async def go():
        bad = client.add_request("x", "z" * 100, SamplingParams(max_tokens=2))
        good = client.add_request("y", "ok", SamplingParams(max_tokens=2))
        results = await asyncio.gather(bad, good, return_exceptions=True)
        assert isinstance(results[0], ValueError) and "longer than" in str(results[0])
        outs = [o async for o in results[1]]
        assert outs[-1].finished and outs[-1].outputs[0].text == "ab"
        failing = await client.add_request("z", "BOOM", SamplingParams(max_tokens=2))
        with pytest.raises(EngineError):
            async for _ in failing:
                pass
        client.shutdown()
        with pytest.raises(EngineDeadError):
            await client.add_request("w", "ok", SamplingParams())

    asyncio.run(go())


def test_dead_engine_is_503():
    client = AsyncEngine(FakeCoreEngine(), start=False)
    app = build_app(client, served_model_names="fake")
    with running_server(app) as url:
        assert httpx.get(url + "/health").status_code == 503
        r = httpx.post(url + "/v1/chat/completions", json=chat("hi"))
        assert r.status_code == 503 and r.json()["error"]["message"]


def test_metrics(fake, http):
    http.post("/v1/chat/completions", json=chat("count me", max_tokens=3))
    text = httpx.get(fake[2] + "/metrics").text
    for name in (
        "jaxmm_http_requests_total",
        "jaxmm_request_success_total",
        "jaxmm_prompt_tokens_total",
        "jaxmm_generation_tokens_total",
        "jaxmm_time_to_first_token_seconds_bucket",
        "jaxmm_inter_token_latency_seconds_bucket",
        "jaxmm_e2e_request_latency_seconds_bucket",
        "jaxmm_num_requests_running",
        "jaxmm_num_requests_waiting",
        "jaxmm_kv_cache_usage_perc 0.25",
        "jaxmm_prefix_cache_hit_rate 0.25",
        "jaxmm_num_preemptions_total",
    ):
        assert name in text, name
    assert 'path="/v1/chat/completions",status="200"' in text
    httpx.get(fake[2] + "/v1/models")  # no key
    assert 'path="/v1/models",status="401"' in httpx.get(fake[2] + "/metrics").text
