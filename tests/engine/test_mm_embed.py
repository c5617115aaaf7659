"""Embeddings from a vision-language model: `LLM(runner="pooling")` on a tiny random Qwen2-VL.

The vector of a prompt is the final (normed) hidden state of its last token, L2-normalised
(DSE-Qwen2 style). It must match transformers' `last_hidden_state[:, -1]` for text-only,
image, two-image and video prompts (cosine >= 0.9999; unnormalised within 1e-4), with the
prompts packed several to a step and long ones chunked (64-token steps). /v1/embeddings
takes vLLM's `messages` form, rendered with the chat template, and gives the offline vector.
"""

from __future__ import annotations

import base64
import io
import os

import httpx
import numpy as np
import pytest
import torch

from jaxmm import LLM, PoolingParams
from jaxmm.engine.pooling_engine import PoolingClient
from jaxmm.server.app import build_app
from tests.helpers import link_model_files
from tests.models.test_vlm_parity import IMAGES, _hf_inputs, _hf_model, make_vlm, prompts_for
from tests.server.util import running_server

ARCH = "qwen2_vl"
NAME = "dse"


@pytest.fixture(scope="module")
def ckpt(ckpt_root):
    return make_vlm(ckpt_root, ARCH)


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(
        ckpt,
        runner="pooling",
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=64,
        limit_mm_per_prompt={"image": 2, "video": 1},
    )


def _hf_last_hidden(ckpt: str, prompts: list[dict], tok) -> np.ndarray:
    hf = _hf_model(ckpt, ARCH)
    rows = []
    with torch.no_grad():
        for p in prompts:
            inputs = _hf_inputs(ckpt, ARCH, p, tok)
            out = hf.model(**inputs)
            rows.append(out.last_hidden_state[0, -1].numpy())
    return np.stack(rows)


def test_embeddings_match_transformers_hidden_states(llm, ckpt):
    prompts = prompts_for(ARCH)  # text only, an image, two images, a video, an image
    outs = llm.embed(prompts, use_tqdm=False)
    ours = np.array([o.outputs.embedding for o in outs])
    ref = _hf_last_hidden(ckpt, prompts, llm.get_tokenizer())
    assert len({len(o.prompt_token_ids) for o in outs}) == len(outs)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cos = (ours * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999, cos

    raw = llm.embed(prompts[1:3], PoolingParams(normalize=False), use_tqdm=False)
    np.testing.assert_allclose([o.outputs.embedding for o in raw], ref[1:3], atol=1e-4, rtol=0)
    # one at a time (no packing), and again (the image rows come from the encoder cache)
    alone = [llm.embed(p, use_tqdm=False)[0].outputs.embedding for p in prompts[1:3]]
    np.testing.assert_allclose(alone, ours[1:3], atol=1e-5)

    assert llm.llm_engine is None
    with pytest.raises(ValueError, match="embedding model"):
        llm.generate("hi")


def test_pooling_types_that_need_every_token_are_refused(ckpt):
    with pytest.raises(ValueError, match="needs every token's hidden state"):
        LLM(ckpt, task="embed", pooler_config={"pooling_type": "MEAN"})
    with pytest.raises(ValueError, match="not supported; supported: pooling_type, normalize"):
        LLM(ckpt, runner="pooling", pooler_config={"softmax": True})


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_server_messages_form_gives_the_offline_vector(llm):
    tok = llm.get_tokenizer()
    text = "What is shown here?"
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _data_url(IMAGES[1])}},
                {"type": "text", "text": text},
            ],
        }
    ]
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
        tokenize=False,
        add_generation_prompt=False,
    )
    ids = tok(rendered, add_special_tokens=False).input_ids
    prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": IMAGES[1]}}
    [want] = llm.embed(prompt, use_tqdm=False)
    app = build_app(PoolingClient(llm.pooling_engine), served_model_names=[NAME], model_path="x")
    with running_server(app) as url:
        r = httpx.post(
            f"{url}/v1/embeddings", json={"model": NAME, "messages": messages}, timeout=120
        )
        assert r.status_code == 200, r.text
        body = r.json()
        got = body["data"][0]["embedding"]
        np.testing.assert_allclose(got, want.outputs.embedding, atol=1e-6)
        assert body["usage"]["prompt_tokens"] == len(want.prompt_token_ids) > len(ids)

        r = httpx.post(f"{url}/v1/embeddings", json={"model": NAME, "input": "hello"}, timeout=60)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(
            r.json()["data"][0]["embedding"],
            llm.embed("hello", use_tqdm=False)[0].outputs.embedding,
            atol=1e-6,
        )
        bad = {"model": NAME, "messages": messages, "input": "x"}
        r = httpx.post(f"{url}/v1/embeddings", json=bad, timeout=60)
        assert r.status_code == 400 and "either input or messages" in r.text
        r = httpx.post(f"{url}/v1/embeddings", json={"model": NAME}, timeout=60)
        assert r.status_code == 400 and "input (or messages)" in r.text


@pytest.fixture(scope="module")
def st_ckpt(ckpt, tmp_path_factory):
    """The checkpoint with sentence-transformers files: CLS pooling, no Normalize module."""
    import json
    import shutil

    dst = link_model_files(ckpt, str(tmp_path_factory.mktemp("st_qwen2_vl")))
    for name in os.listdir(ckpt):
        if name.startswith(("tokenizer", "chat_template", "preprocessor", "special_tokens")):
            shutil.copy(os.path.join(ckpt, name), dst)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    with open(os.path.join(dst, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(dst, "1_Pooling"))
    with open(os.path.join(dst, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 64, "pooling_mode_cls_token": True}, f)
    return dst


def test_pooling_from_sentence_transformers_files(st_ckpt, ckpt, llm):
    st = LLM(
        st_ckpt, runner="pooling", dtype="float32", max_model_len=256, max_num_batched_tokens=64
    )
    assert (
        st.pooling_engine.pooler_config.pooling_type,
        st.pooling_engine.pooler_config.normalize,
    ) == ("CLS", False)
    prompts = prompts_for(ARCH)[:3]
    tok = llm.get_tokenizer()
    hf = _hf_model(ckpt, ARCH)
    with torch.no_grad():  # the first token's final hidden state, unnormalised
        ref = [
            hf.model(**_hf_inputs(ckpt, ARCH, p, tok)).last_hidden_state[0, 0].numpy()
            for p in prompts
        ]
    got = [o.outputs.embedding for o in st.embed(prompts, use_tqdm=False)]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # overridden back to LAST + normalize: the default engine's vectors
    last = LLM(
        st_ckpt,
        runner="pooling",
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=64,
        pooler_config={"pooling_type": "last", "normalize": True},
    )
    np.testing.assert_allclose(
        [o.outputs.embedding for o in last.embed(prompts, use_tqdm=False)],
        [o.outputs.embedding for o in llm.embed(prompts, use_tqdm=False)],
        atol=1e-6,
    )
