"""LLaVA-OneVision under `jaxmm serve` (engine core in its own process), with the official
openai client: one image (tiled) and two images (one tile each) in chat completions give the
offline engine's prompt and tokens; the placeholders come from the model's declared
interface in the server process, the per-prompt tiling choice is the core's."""

from __future__ import annotations

import base64
import io

import openai
import pytest

from tests.models.test_llava_onevision import SQUARE, WIDE, make_onevision
from tests.server.live_util import KEY, NAME, live_server

ENGINE_KW = dict(dtype="float32", max_model_len=256, max_num_batched_tokens=64)


def _url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(*images) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": _url(im)}} for im in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is it?"}]}]


@pytest.fixture(scope="module")
def path(ckpt_root):
    return make_onevision(ckpt_root)


def test_chat_completions_match_the_offline_engine(path):
    from jaxmm import LLM, SamplingParams

    llm = LLM(path, **ENGINE_KW)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    cases = [_messages(WIDE), _messages(SQUARE, WIDE)]
    want = [llm.chat(m, params, use_tqdm=False)[0] for m in cases]
    # WIDE alone: 2x2 tiles cropped and shrunk to 4x6 (+ newlines) after the 16 base
    # patches; with another image, each is one 16-patch tile and a newline
    image = llm.get_tokenizer().convert_tokens_to_ids("<image>")
    assert [w.prompt_token_ids.count(image) for w in want] == [16 + 4 * 7, 2 * 17]
    with live_server(path, engine_process=True, **ENGINE_KW) as (_, url):
        oai = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        for messages, w in zip(cases, want):
            r = oai.chat.completions.create(
                model=NAME,
                messages=messages,
                max_tokens=6,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            assert r.usage.prompt_tokens == len(w.prompt_token_ids)
            assert r.choices[0].message.content == w.outputs[0].text
