"""Bad media in a batch, on the tiny Qwen2-VL: each bad item is a clear ValueError / MediaError
naming the problem, raised while the batch is prepared, so nothing of the batch is queued
(not even its good prompts); through a real server a bad-media request is answered 400 (413
for an image over the pixel cap) while good requests sent at the same moment complete."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from jaxmm import LLM, SamplingParams
from jaxmm.multimodal.fetch import MediaError
from tests.models.test_vlm_parity import I_QWEN, _image, make_vlm

PROMPT = f"{I_QWEN}Describe the image."
ENGINE_KW = dict(
    dtype="float32",
    max_model_len=256,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    kv_cache_memory_bytes=1 << 22,
    enable_mm_embeds=True,
)


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    data = _encoded(_image(64, 64, 7), "JPEG")
    return data[: len(data) // 2]


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG signature + IHDR of 20000x20000 RGB, a tiny IDAT and IEND: ~80 bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def wrong_shape_embeds() -> dict:
    # a 16x16-patch grid takes 4x4 = 16 tokens of the text width (64); 5 rows are sent
    return {"image_embeds": np.zeros((5, 64), np.float32), "image_grid_thw": [1, 4, 4]}


@pytest.fixture(scope="module")
def ckpt(ckpt_root):
    return make_vlm(ckpt_root, "qwen2_vl")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "empty.png").write_bytes(b"")
    return d


@pytest.fixture(scope="module")
def llm(ckpt, media_dir):
    return LLM(ckpt, allowed_local_media_path=str(media_dir), **ENGINE_KW)


def _sp():
    return SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


BAD = {
    "truncated_jpeg": (lambda d: truncated_jpeg(), MediaError, "truncated or corrupt"),
    "zero_byte_bytes": (lambda d: b"", MediaError, "image is empty"),
    "zero_byte_file": (lambda d: f"file://{d}/empty.png", MediaError, "empty.png' is empty"),
    "huge_png_header": (lambda d: huge_png_header(), MediaError, "too large|pixels"),
    "wrong_shape_embeds": (
        lambda d: wrong_shape_embeds(),
        ValueError,
        r"must have shape .*\(4, 64\); got \(5, 64\)",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_item_fails_the_batch_before_anything_is_queued(llm, media_dir, name):
    make, exc, match = BAD[name]
    engine = llm.llm_engine
    before = dict(engine.stats)
    good = {"prompt": PROMPT, "multi_modal_data": {"image": _image(40, 50, 1)}}
    bad = {"prompt": PROMPT, "multi_modal_data": {"image": make(media_dir)}}
    with pytest.raises(exc, match=match) as info:
        llm.generate([good, bad], _sp(), use_tqdm=False)
    if name == "huge_png_header":
        assert info.value.status == 413  # over a size cap, checked from the header alone
    elif isinstance(info.value, MediaError):
        assert info.value.status == 400
    # nothing of the batch was queued, the good prompt included
    assert not engine.has_unfinished_requests()
    assert engine.get_num_unfinished_requests() == 0
    assert engine.stats["prompt_tokens"] == before["prompt_tokens"]
    # and the engine still serves
    out = llm.generate([good], _sp(), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3


def test_huge_png_header_is_refused_without_decoding():
    data = huge_png_header()
    assert len(data) < 200
    from jaxmm.multimodal.media import load_image

    with pytest.raises(MediaError, match="too large|pixels"):
        load_image(data)


# ---------------------------------------------------------------------------------------
# Through the server

KEY = "sk-test"
NAME = "tiny-qwen2-vl"


@pytest.fixture(scope="module")
def live(ckpt):
    from jaxmm.engine.async_engine import AsyncEngine
    from jaxmm.server.app import build_app
    from tests.server.util import running_server

    engine = LLM(ckpt, **ENGINE_KW).llm_engine
    client = AsyncEngine(engine)
    app = build_app(client, served_model_names=[NAME], model_path=ckpt, api_keys=KEY)
    with running_server(app) as url:
        yield engine, url
    client.shutdown()


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _body(url: str) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "What is in the picture?"},
    ]
    return {
        "model": NAME,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 4,
        "ignore_eos": True,
    }


def test_server_bad_media_400_while_concurrent_good_requests_complete(live):
    engine, url = live
    goods = [
        _data_url(_encoded(_image(32 + 4 * i, 40, 20 + i), "PNG"), "image/png") for i in range(4)
    ]
    bads = {
        "truncated_jpeg": (_data_url(truncated_jpeg(), "image/jpeg"), 400, "truncated"),
        "zero_byte": ("data:image/png;base64,", 400, "empty"),
        "huge_png_header": (_data_url(huge_png_header(), "image/png"), 413, "too large"),
    }

    async def go():
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
            # good and bad interleaved, all in flight at once
            bodies = []
            for i, good in enumerate(goods):
                bodies.append(("good", good))
                if i < len(bads):
                    name = list(bads)[i]
                    bodies.append((name, bads[name][0]))
            calls = [client.post("/v1/chat/completions", json=_body(u)) for _, u in bodies]
            replies = await asyncio.gather(*calls)
            return [name for name, _ in bodies], replies

    names, replies = asyncio.run(go())
    for name, r in zip(names, replies, strict=True):
        if name == "good":
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["finish_reason"] == "length"
            assert body["usage"]["completion_tokens"] == 4
        else:
            _, status, words = bads[name]
            assert r.status_code == status, (name, r.status_code, r.text)
            assert words in r.json()["error"]["message"], (name, r.text)
    # the bad requests left nothing behind
    end = time.monotonic() + 20
    while engine.has_unfinished_requests() and time.monotonic() < end:
        time.sleep(0.02)
    assert not engine.has_unfinished_requests()
