"""Every error path answers in OpenAI's documented shape, `{"error": {"message", "type",
"param", "code"}}` with `code` a string or null (never the HTTP status), and a chat message
with a role OpenAI does not know is a 400. A real uvicorn over the fake core engine."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from jaxmm.engine.async_engine import AsyncEngine
from jaxmm.server.app import build_app
from jaxmm.server.chat import CHAT_ROLES
from jaxmm.server.errors import APIError, from_exception
from tests.server.fakes import FakeCoreEngine
from tests.server.util import running_server

KEY = "sk-shape"


@pytest.fixture(scope="module")
def url():
    core = FakeCoreEngine(max_model_len=64, slow_step_s=0.01)
    client = AsyncEngine(core)
    app = build_app(client, served_model_names=["fake"], api_keys=[KEY], max_body_bytes=4096)
    with running_server(app) as u:
        yield u
    client.shutdown()


def check_shape(body: dict) -> dict:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    return err


def _chat(**kw) -> dict:
    return {"model": "fake", "messages": [{"role": "user", "content": "hi"}], **kw}


CASES = [
    # (method, path, body or raw bytes, headers, expected status)
    ("POST", "/v1/chat/completions", b"{not json", {}, 400),
    ("POST", "/v1/chat/completions", _chat(n=0), {}, 400),
    ("POST", "/v1/chat/completions", _chat(temperature=-1), {}, 400),
    ("POST", "/v1/chat/completions", _chat(model="gpt-4"), {}, 404),
    ("POST", "/v1/completions", {"model": "fake", "prompt": [[1], "a"]}, {}, 400),
    ("POST", "/v1/completions", {"model": "fake", "prompt": "x" * 500}, {}, 400),
    ("POST", "/v1/chat/completions", _chat(padding="y" * 5000), {}, 413),
    ("GET", "/v1/nothing-here", None, {}, 404),
    ("GET", "/v1/chat/completions", None, {}, 405),
    ("GET", "/v1/models", None, {"Authorization": "Bearer wrong"}, 401),
]


@pytest.mark.parametrize("method,path,body,headers,status", CASES)
def test_every_error_has_openai_shape(url, method, path, body, headers, status):
    hdrs = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers}
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    r = httpx.request(method, url + path, content=content, headers=hdrs, timeout=30)
    assert r.status_code == status, r.text
    check_shape(r.json())


def test_an_error_inside_a_stream_has_the_same_shape(url):
    body = {**_chat(stream=True, max_tokens=8)}
    body["messages"][0]["content"] = "BOOM"  # the fake engine's next step raises
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    errors = [json.loads(line[6:]) for line in lines if '"error"' in line]
    assert errors, lines
    err = check_shape(errors[-1])
    assert err["type"] == "internal_server_error"


def test_codes_are_strings_or_null():
    for e in (ValueError("bad"), RuntimeError("internal detail"), ImportError("x")):
        err = check_shape(from_exception(e).body())
        assert err["code"] is None
    hidden = from_exception(RuntimeError("internal detail")).body()
    assert "internal detail" not in json.dumps(hidden)
    with pytest.raises(TypeError):
        APIError(400, "an integer code", code=400)


def test_unknown_role_is_400_through_the_openai_client(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="fake", messages=[{"role": "wizard", "content": "hi"}], max_tokens=2
        )
    assert e.value.status_code == 400
    assert e.value.code == "invalid_value" and e.value.param == "messages.[0].role"
    assert "wizard" in e.value.message
    # a later message with a bad role is named by its index
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "fake", "messages": [{"role": "user", "content": "a"}, {"role": 7}]},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert r.status_code == 400 and check_shape(r.json())["param"] == "messages.[1].role"


@pytest.mark.parametrize("role", CHAT_ROLES)
def test_every_openai_role_is_accepted(url, role):
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    messages = [{"role": role, "content": "hi"}]
    if role in ("tool", "function"):
        messages[0].update(tool_call_id="call_1", name="f")
    r = client.chat.completions.create(model="fake", messages=messages, max_tokens=2)
    assert r.choices[0].message.content == "ab"
