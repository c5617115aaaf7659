"""Vision-language models under `jaxmm serve`: the engine core in a process of its own.

The server process renders chat messages from the model's declared interface (sent by the
core), and the engine's own front end prepares the prompt in the core. Through a real
uvicorn and the official openai client: the tokens equal the offline engine's; a repeated
image (by uuid) runs no encoder; bad media is a 400 that harms no other request.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from tests.models.test_vlm_parity import make_qwen
from tests.server.live_util import KEY, NAME, live_server

ENGINE_KW = dict(dtype="float32", max_model_len=256, max_num_batched_tokens=64)


def _data_url(seed: int, size=(40, 32)) -> str:
    rs = np.random.RandomState(seed)
    img = Image.fromarray(rs.randint(0, 256, (size[1], size[0], 3), np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(url: str, uuid: str | None = None) -> list[dict]:
    part = {"type": "image_url", "image_url": {"url": url}}
    if uuid is not None:
        part["uuid"] = uuid
    return [{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}]


@pytest.fixture(scope="module")
def path(ckpt_root):
    return make_qwen(ckpt_root, "qwen2_vl", seed=1)


@pytest.fixture(scope="module")
def live(path):
    with live_server(path, engine_process=True, **ENGINE_KW) as x:
        yield x


@pytest.fixture(scope="module")
def oai(live):
    return openai.OpenAI(base_url=live[1] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_chat_with_an_image_matches_the_offline_engine(path, live, oai):
    from jaxmm import LLM, SamplingParams

    engine, _ = live
    assert type(engine).__name__ == "CoreProbe"  # the core runs in its own process
    url = _data_url(0)
    r = oai.chat.completions.create(
        model=NAME, messages=_messages(url), max_tokens=6, temperature=0
    )
    llm = LLM(path, **ENGINE_KW)
    want = llm.chat(_messages(url), SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert r.choices[0].message.content == want[0].outputs[0].text
    assert r.usage.prompt_tokens == len(want[0].prompt_token_ids)
    # streamed: the same text
    chunks = oai.chat.completions.create(
        model=NAME, messages=_messages(url), max_tokens=6, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want[0].outputs[0].text


def test_a_repeated_image_runs_no_encoder(live, oai):
    engine, _ = live
    url = _data_url(1)
    oai.chat.completions.create(model=NAME, messages=_messages(url, "pic"), max_tokens=2)
    before = engine.stats["encoder_items"]
    again = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": None, "uuid": "pic"},
                {"type": "text", "text": "And now?"},
            ],
        }
    ]
    r = oai.chat.completions.create(model=NAME, messages=again, max_tokens=2)
    assert r.choices[0].finish_reason == "length"
    assert engine.stats["encoder_items"] == before


def test_bad_media_is_a_400_and_harms_nothing_else(live, oai):
    bad = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=NAME, messages=_messages(bad), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="never sent|encoder cache"):
        oai.chat.completions.create(
            model=NAME,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": None, "uuid": "unknown"}],
                }
            ],
            max_tokens=2,
        )
    r = oai.chat.completions.create(model=NAME, messages=_messages(_data_url(2)), max_tokens=2)
    assert r.choices[0].finish_reason == "length"
