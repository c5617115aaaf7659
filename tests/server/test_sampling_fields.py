"""The smaller request fields on a real uvicorn over the tiny Llama (its engine in a process of
its own, as `jaxmm serve` runs it), through the official `openai` client: logit_bias,
max_completion_tokens, stream_options.include_usage, echo with logprobs, prompt_logprobs."""

from __future__ import annotations

import math

import openai
import pytest
from transformers import AutoTokenizer

from jaxmm import LLM, SamplingParams
from tests.helpers import make_checkpoint
from tests.server.live_util import KEY, NAME, live_server

ENGINE_KW = dict(
    max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory_bytes=1 << 22
)
MESSAGES = [{"role": "user", "content": "Hello, my name is"}]
PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def setup(ckpt_root):
    path = make_checkpoint(ckpt_root, "llama")
    with live_server(path, **ENGINE_KW) as (_, url):
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY), path


def test_logit_bias_forces_and_bans_tokens(setup):
    client, path = setup
    forced = _token_id(client, "x")
    r = client.completions.create(
        model=NAME,
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        logit_bias={str(forced): 100},
    )
    # +100 makes the token the argmax at every step
    assert r.choices[0].text == "xxxx"
    # -100 on every token but two: only those two remain (a table of 254 entries), while a
    # free request shares the batch
    keep = {forced, _token_id(client, "y")}
    vocab = len(AutoTokenizer.from_pretrained(path))
    assert vocab - 2 <= 300
    bias = {str(t): -100 for t in range(vocab) if t not in keep}
    free = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, n=1)
    r2 = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3, logit_bias=bias
    )
    assert len(r2.choices[0].text) == 6 and set(r2.choices[0].text) <= {"x", "y"}
    assert free.usage.completion_tokens >= 1


def _token_id(client, text: str) -> int:
    root = str(client.base_url).removesuffix("/v1/")
    out = client.post(
        root + "/tokenize", body={"prompt": text, "add_special_tokens": False}, cast_to=object
    )
    assert out["count"] == 1, out
    return out["tokens"][0]


def test_logit_bias_bad_values(setup):
    client, _ = setup
    for bias in ({"1": 1000}, {"x": 1}, {"100000": 1}, {str(i): 1 for i in range(301)}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=NAME, messages=MESSAGES, max_tokens=2, logit_bias=bias
            )
        assert e.value.body["param"] == "logit_bias"


def test_max_completion_tokens_and_usage_in_streams(setup):
    client, _ = setup
    r = client.chat.completions.create(
        model=NAME,
        messages=MESSAGES,
        max_completion_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    for stream in (
        client.chat.completions.create(
            model=NAME,
            messages=MESSAGES,
            max_completion_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        ),
        client.completions.create(
            model=NAME,
            prompt=PROMPT,
            max_tokens=3,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        ),
    ):
        chunks = list(stream)
        assert all(c.usage is None for c in chunks[:-1])
        last = chunks[-1]
        assert last.choices == [] and last.usage.completion_tokens in (3, 6)
        assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_echo_with_logprobs(setup):
    client, path = setup
    r = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    c = r.choices[0]
    n_prompt = r.usage.prompt_tokens
    lp = c.logprobs
    assert c.text.startswith(PROMPT)
    assert len(lp.tokens) == n_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens[1:]) == c.text  # <s> leads the tokens, not the text
    assert lp.text_offset == sorted(lp.text_offset)
    # the same through a stream: the echo chunk carries the prompt's logprobs
    chunks = list(
        client.completions.create(
            model=NAME,
            prompt=PROMPT,
            max_tokens=3,
            temperature=0,
            echo=True,
            logprobs=2,
            stream=True,
        )
    )
    tokens = [t for ch in chunks for t in (ch.choices[0].logprobs.tokens if ch.choices else [])]
    lps = [
        x for ch in chunks for x in (ch.choices[0].logprobs.token_logprobs if ch.choices else [])
    ]
    assert tokens == lp.tokens
    assert lps[0] is None
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(lps[1:], lp.token_logprobs[1:]))


def test_prompt_logprobs_match_offline(setup):
    """Prompt logprob j (longer than one 32-token chunk) equals the logprob the offline engine
    gives the same token when it generates from the first j tokens."""
    client, path = setup
    prompt = PROMPT + " Rome. The capital of Spain is Madrid."
    r = client.post(
        "/completions",
        body=dict(model=NAME, prompt=prompt, max_tokens=1, prompt_logprobs=1, temperature=0),
        cast_to=object,
    )
    plp = r["choices"][0]["prompt_logprobs"]
    assert r["usage"]["prompt_tokens"] == len(plp) > 32 and plp[0] is None
    llm = LLM(path, **ENGINE_KW)
    ids = llm.llm_engine.tokenizer(prompt).input_ids
    for j in (1, len(ids) // 2, len(ids) - 1):
        out = llm.generate(
            {"prompt_token_ids": ids[:j]}, SamplingParams(max_tokens=1, temperature=0, logprobs=1)
        )[0].outputs[0]
        (best,) = [(t, x) for t, x in out.logprobs[0].items() if x.rank == 1]
        entry = plp[j]
        assert str(ids[j]) in entry
        (ptop,) = [(int(t), x) for t, x in entry.items() if x["rank"] == 1]
        assert ptop[0] == best[0]
        assert math.isclose(ptop[1]["logprob"], best[1].logprob, abs_tol=1e-4)
