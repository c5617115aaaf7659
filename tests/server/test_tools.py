"""Tool calls and reasoning through a real uvicorn (`--tool-call-parser hermes
--enable-auto-tool-choice --reasoning-parser qwen3`) with the official `openai` client.

The tiny model's weights are random, so what it "says" is forced with a structured-output
choice of one exact text (auto tool calls, reasoning); `required` and named tool choices
are enforced by the server's own constraint and must parse whatever the model picks."""

from __future__ import annotations

import json

import openai
import pytest

from jaxmm.server.chat_output import ChatOutput
from jaxmm.server.tool_parsers import ToolCallParser, get_format
from tests.helpers import make_checkpoint
from tests.server.live_util import KEY, NAME, live_server

ENGINE_KW = dict(
    max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, kv_cache_memory_bytes=1 << 22
)
APP_KW = dict(tool_call_parser="hermes", enable_auto_tool_choice=True, reasoning_parser="qwen3")
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Paris", "Rome"]},
                    "metric": {"type": "boolean"},
                },
                "required": ["city", "metric"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
CALL_TEXT = (
    'Let me check.<tool_call>\n{"name": "get_weather", "arguments": '
    '{"city": "Paris", "metric": true}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def client(ckpt_root):
    path = make_checkpoint(ckpt_root, "llama")
    with live_server(path, engine_process=False, app_kw=APP_KW, **ENGINE_KW) as (_, url):
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY)


def forced(text: str) -> dict:
    return {"structured_outputs": {"choice": [text]}}


def collect(stream) -> dict:
    """A chat stream folded the way OpenAI clients fold it."""
    out: dict = {"content": "", "reasoning": "", "calls": {}, "finish": None}
    for chunk in stream:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        d = c.delta
        out["content"] += d.content or ""
        out["reasoning"] += getattr(d, "reasoning_content", None) or ""
        for tc in d.tool_calls or []:
            call = out["calls"].setdefault(tc.index, {"id": None, "name": None, "args": ""})
            if tc.id:
                assert call["id"] is None, "a call's id comes once"
                call["id"], call["name"] = tc.id, tc.function.name
            call["args"] += tc.function.arguments or ""
        out["finish"] = c.finish_reason or out["finish"]
    return out


def test_auto_hermes_calls(client):
    kw = dict(
        model=NAME, messages=MESSAGES, tools=TOOLS, max_tokens=200, extra_body=forced(CALL_TEXT)
    )
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.content == "Let me check."
    (call,) = msg.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "metric": True}
    s = collect(client.chat.completions.create(stream=True, **kw))
    assert s["finish"] == "tool_calls" and s["content"] == "Let me check."
    (scall,) = s["calls"].values()
    assert scall["name"] == "get_weather" and scall["id"].startswith("call_")
    assert json.loads(scall["args"]) == {"city": "Paris", "metric": True}


def test_tool_choice_none_keeps_text(client):
    r = client.chat.completions.create(
        model=NAME,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=200,
        extra_body=forced(CALL_TEXT),
    )
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == CALL_TEXT
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_are_enforced(client, stream):
    names = {"get_weather", "get_time"}
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        kw = dict(
            model=NAME,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice=choice,
            parallel_tool_calls=False,
            max_tokens=80,
            temperature=0,
        )
        if stream:
            s = collect(client.chat.completions.create(stream=True, **kw))
            calls = [(c["name"], c["args"]) for c in s["calls"].values()]
            finish = s["finish"]
        else:
            r = client.chat.completions.create(**kw)
            calls = [
                (c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls
            ]
            finish = r.choices[0].finish_reason
        assert len(calls) == 1
        name, args = calls[0]
        args = json.loads(args)
        if choice == "required":
            assert name in names and finish == "tool_calls"
        else:
            assert name == "get_time" and finish == "stop"
        if name == "get_time":
            assert args["zone"] in ("UTC", "CET")
        else:
            assert args["city"] in ("Paris", "Rome") and isinstance(args["metric"], bool)


def test_reasoning_content(client):
    text = "<think>Paris is in France.</think>\n\nIt is sunny."
    kw = dict(model=NAME, messages=MESSAGES, max_tokens=200, extra_body=forced(text))
    msg = client.chat.completions.create(**kw).choices[0].message
    assert msg.reasoning_content == "Paris is in France."
    assert msg.content == "It is sunny."
    s = collect(client.chat.completions.create(stream=True, **kw))
    assert s["reasoning"] == "Paris is in France." and s["content"] == "It is sunny."


def test_tool_results_rendered_back(client):
    """An assistant turn with tool calls and the tool's answer go back through the template."""
    conversation = MESSAGES + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    root = str(client.base_url).removesuffix("/v1/")
    ids = client.post(root + "/tokenize", body={"messages": conversation}, cast_to=object)["tokens"]
    text = client.post(root + "/detokenize", body={"tokens": ids}, cast_to=object)["prompt"]
    assert "<|tool|>sunny, 21 C<|end|>" in text
    r = client.chat.completions.create(model=NAME, messages=conversation, tools=TOOLS, max_tokens=3)
    assert r.usage.prompt_tokens == len(ids)


def test_bad_tool_requests(client):
    for kw, param in (
        (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="sometimes"), "tool_choice"),
        (dict(tools=[{"type": "function", "function": {"parameters": {}}}]), "tools"),
        (dict(tool_choice="required", response_format={"type": "json_object"}), "response_format"),
    ):
        body = {"tools": TOOLS, **kw}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=NAME, messages=MESSAGES, max_tokens=2, extra_body=body
            )
        assert e.value.body["param"] == param


class _State:
    tool_call_parser = None
    enable_auto_tool_choice = False
    reasoning_parser = None


class _Req:
    tools = TOOLS
    tool_choice = "auto"


def test_auto_needs_the_flags():
    with pytest.raises(Exception, match="enable-auto-tool-choice"):
        ChatOutput(_Req(), _State())
    _Req.tool_choice = None  # unset with tools and no flags: plain content
    assert ChatOutput(_Req(), _State()).mode == "none"


@pytest.mark.parametrize(
    "fmt,text,calls,content",
    [
        (
            "mistral",
            '[TOOL_CALLS][{"name": "a", "arguments": {"q": "x}y"}}, '
            '{"name": "b", "arguments": {}}]',
            [("a", {"q": "x}y"}), ("b", {})],
            None,
        ),
        (
            "llama3_json",
            '{"name": "get_time", "parameters": {"zone": "UTC"}}; {"name": "g", "parameters": {}}',
            [("get_time", {"zone": "UTC"}), ("g", {})],
            None,
        ),
        ("hermes", "no call here <tool", [], "no call here <tool"),
        ("hermes", '<tool_call>{"name": "a", "arguments": {"x": </tool_call>', [], None),
    ],
)
def test_parsers_whole_and_streamed(fmt, text, calls, content):
    got_content, got = ToolCallParser(get_format(fmt)).extract(text)
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    if calls:
        assert got_content == content
    else:
        assert got_content == text  # nothing valid: all of it is content
    for step in (1, 4, 1000):
        p = ToolCallParser(get_format(fmt))
        pieces = [text[i : i + step] for i in range(0, len(text), step)]
        streamed: dict = {}
        text_out = ""
        for i, piece in enumerate(pieces):
            d = p.feed(piece, i == len(pieces) - 1)
            text_out += d.get("content", "")
            for tc in d.get("tool_calls", []):
                c = streamed.setdefault(tc["index"], ["", ""])
                c[0] += tc["function"].get("name", "")
                c[1] += tc["function"].get("arguments", "")
        if calls:
            assert [(n, json.loads(a)) for n, a in streamed.values()] == calls
        else:
            assert text_out == text or streamed  # a broken call may have been announced
