"""Structured outputs on the tiny random Llama: whatever the random weights prefer, the
grammar mask alone must make the output valid. Offline (`SamplingParams(structured_outputs=
...)`) and through a real uvicorn with the official `openai` client (response_format,
`chat.completions.parse` with a pydantic model, vLLM's `structured_outputs`)."""

from __future__ import annotations

import json
import re
import time
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from jaxmm import LLM, SamplingParams
from jaxmm.engine.async_engine import AsyncEngine
from jaxmm.sampling_params import StructuredOutputsParams
from jaxmm.server.app import build_app
from tests.helpers import make_checkpoint
from tests.server.live_util import KEY, NAME
from tests.server.util import running_server

ENGINE_KW = dict(
    max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, kv_cache_memory_bytes=1 << 22
)
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome"]},
        "sunny": {"type": "boolean"},
        "temp": {"type": "integer", "minimum": -50, "maximum": 50},
    },
    "required": ["city", "sunny", "temp"],
    "additionalProperties": False,
}


class Weather(BaseModel):
    city: Literal["Paris", "Rome"]
    sunny: bool
    temp: int = Field(ge=-50, le=50)


@pytest.fixture(scope="module")
def llm(ckpt_root):
    return LLM(make_checkpoint(ckpt_root, "llama"), **ENGINE_KW)


@pytest.fixture(scope="module")
def client(llm):
    engine = AsyncEngine(llm.llm_engine)
    app = build_app(engine, served_model_names=[NAME], api_keys=KEY)
    with running_server(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY)
    engine.shutdown()


def _check_weather(text: str) -> None:
    w = Weather.model_validate_json(text)
    assert w.city in ("Paris", "Rome")


def test_offline_mixed_batch(llm):
    """Constrained and free requests in one batch; n > 1 and a stop string still work."""
    so = StructuredOutputsParams
    params = [
        SamplingParams(max_tokens=60, temperature=0, structured_outputs=so(json=SCHEMA)),
        SamplingParams(max_tokens=12, temperature=0),
        SamplingParams(
            max_tokens=20,
            temperature=1.0,
            seed=1,
            n=3,
            structured_outputs=so(regex=r"\d{3}-[a-z]{2}"),
        ),
        SamplingParams(max_tokens=20, structured_outputs=so(choice=["yes", "no"]), temperature=0),
        # the stop string cuts the constrained text
        SamplingParams(
            max_tokens=20, temperature=0, stop=["-"], structured_outputs=so(regex=r"ab-cd")
        ),
    ]
    free_alone = llm.generate("Hello", params[1])[0].outputs[0].text
    outs = llm.generate(["Hello"] * len(params), params)
    _check_weather(outs[0].outputs[0].text)
    assert outs[0].outputs[0].finish_reason == "stop"
    # the free request in the mixed batch is what it is alone
    assert outs[1].outputs[0].text == free_alone
    assert len(outs[2].outputs) == 3
    for o in outs[2].outputs:
        assert re.fullmatch(r"\d{3}-[a-z]{2}", o.text), o.text
    assert outs[3].outputs[0].text in ("yes", "no")
    assert outs[4].outputs[0].text == "ab"


def test_offline_bad_grammar_refused(llm):
    with pytest.raises(ValueError, match="regex"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="(ab")))


def test_parse_pydantic(client):
    r = client.chat.completions.parse(
        model=NAME, messages=MESSAGES, response_format=Weather, max_tokens=60, temperature=0
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Weather)
    assert r.choices[0].finish_reason == "stop"


def test_json_schema_and_json_object(client):
    r = client.chat.completions.create(
        model=NAME,
        messages=MESSAGES,
        max_tokens=60,
        temperature=0.7,
        seed=5,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "w", "schema": SCHEMA, "strict": True},
        },
    )
    _check_weather(r.choices[0].message.content)
    r = client.chat.completions.create(
        model=NAME,
        messages=MESSAGES,
        max_tokens=100,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if r.choices[0].finish_reason == "stop":  # a random model may not close it in 100 tokens
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert r.choices[0].message.content.startswith("{")


@pytest.mark.parametrize(
    "field,check",
    [
        ({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
        ({"regex": r"[A-Z][a-z]{2,5}!"}, lambda t: re.fullmatch(r"[A-Z][a-z]{2,5}!", t)),
        (
            {"grammar": 'start: "(" num ("+" num)? ("*" num)? ")"\nnum: /[1-9]/'},
            lambda t: re.fullmatch(r"\([1-9](\+[1-9])?(\*[1-9])?\)", t),
        ),
        ({"grammar": 'root ::= "yes" | "no"'}, lambda t: t in ("yes", "no")),  # GBNF
        ({"json": SCHEMA}, lambda t: Weather.model_validate_json(t)),
    ],
)
def test_structured_outputs_field(client, field, check):
    r = client.completions.create(
        model=NAME,
        prompt="Answer:",
        max_tokens=60,
        temperature=0,
        extra_body={"structured_outputs": field},
    )
    assert check(r.choices[0].text), r.choices[0].text
    # streamed: the same text, in pieces
    chunks = client.completions.create(
        model=NAME,
        prompt="Answer:",
        max_tokens=60,
        temperature=0,
        stream=True,
        extra_body={"structured_outputs": field},
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


@pytest.mark.parametrize(
    "body,param",
    [
        ({"structured_outputs": {"regex": "(abc"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "start: nope"}}, "structured_outputs"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "response_format",
        ),
        ({"structured_outputs": {"json": {"enum": list(range(100_000))}}}, "structured_outputs"),
    ],
)
def test_bad_constraints_are_400_quickly(client, body, param):
    t0 = time.monotonic()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=5, extra_body=body)
    assert e.value.body["param"] == param
    assert time.monotonic() - t0 < 10


def test_new_grammars_compile_nothing(llm):
    """Once the masked sampler ran, other grammars and mixes of constrained and free rows
    reuse its program: a grammar is data (the bitmask), not a program variant."""
    from jaxmm.runner.model_runner import backend_compile_count

    so = StructuredOutputsParams

    def run(pattern: str, n: int) -> None:
        free = SamplingParams(max_tokens=6, temperature=0)
        tied = SamplingParams(
            max_tokens=6, temperature=0, n=n, structured_outputs=so(regex=pattern)
        )
        outs = llm.generate(["Hi", "Hello"], [tied, free])
        assert all(re.fullmatch(pattern, o.text) for o in outs[0].outputs)

    run("[a-c]{4}", 1)
    runner = llm.llm_engine.runner
    programs, compiles = runner.num_compiled(), backend_compile_count()
    run("x[0-9]{3}y", 1)
    run("(yes|no)", 1)
    assert (runner.num_compiled(), backend_compile_count()) == (programs, compiles)
