"""POST /tokenize and /detokenize on a real uvicorn over the tiny Llama, through the official
`openai` client's raw `post` (vLLM's request and response shapes)."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from tests.helpers import make_checkpoint
from tests.server.live_util import KEY, NAME, live_server

ENGINE_KW = dict(
    max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, kv_cache_memory_bytes=1 << 22
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def setup(ckpt_root):
    path = make_checkpoint(ckpt_root, "llama")
    with live_server(path, engine_process=False, **ENGINE_KW) as (_, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
        # the routes sit beside /v1, as in vLLM: the client posts to an absolute URL
        client.root = url
        yield client, AutoTokenizer.from_pretrained(path)


def post(client, path: str, body: dict) -> dict:
    return client.post(client.root + path, body=body, cast_to=object)


def test_tokenize_prompt(setup):
    client, tok = setup
    text = "Hello, my name is Ada."
    out = post(client, "/tokenize", {"model": NAME, "prompt": text})
    assert out["tokens"] == tok(text).input_ids
    assert out["tokens"][0] == tok.bos_token_id
    assert out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 128
    assert out["token_strs"] is None
    bare = post(client, "/tokenize", {"prompt": text, "add_special_tokens": False})
    assert bare["tokens"] == out["tokens"][1:]
    strs = post(client, "/tokenize", {"prompt": text, "return_token_strs": True})
    assert strs["token_strs"] == tok.convert_ids_to_tokens(out["tokens"])


def test_tokenize_chat(setup):
    client, tok = setup
    out = post(client, "/tokenize", {"model": NAME, "messages": MESSAGES})
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>")
    assert out["tokens"] == tok(text, add_special_tokens=False).input_ids
    assert out["count"] == len(out["tokens"])
    # without the generation prompt: the assistant tag's token is gone from the end
    bare = post(client, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert bare["tokens"] == out["tokens"][:-1]
    # the count matches what chat completions bills as prompt tokens
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=1)
    assert r.usage.prompt_tokens == out["count"]


def test_detokenize_round_trip(setup):
    client, tok = setup
    text = "The capital of France is Paris."
    ids = post(client, "/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]
    assert post(client, "/detokenize", {"model": NAME, "tokens": ids}) == {"prompt": text}


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"prompt": "x", "model": "nope"}, "model"),
    ],
)
def test_bad_requests(setup, path, body, param):
    client, _ = setup
    with pytest.raises(openai.APIStatusError) as e:
        post(client, path, body)
    assert e.value.status_code in (400, 404)
    assert e.value.body["param"] == param
