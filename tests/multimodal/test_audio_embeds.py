"""Precomputed audio embeddings on a tiny random Qwen2-Audio (the parity test's checkpoint).

The embeddings are transformers' own audio tower + projector rows for each clip; a prompt
that carries them (vLLM's {"audio_embeds": ...} dict with numpy / JAX arrays, a float torch
tensor, (N, n, D) for N clips, the chat part form, base64 through the server) must give the
same greedy tokens as the audio itself. Without enable_mm_embeds they are refused; a wrong
shape is an error (a 400 through the server) naming the shape the model takes.
"""

from __future__ import annotations

import base64
import dataclasses
import io

import httpx
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmm import LLM, SamplingParams
from jaxmm.multimodal.audio_inputs import AudioFrontend
from tests.models import test_qwen2_audio as qa

qwen2_audio = qa.qwen2_audio  # the tiny checkpoint fixture
AUDIO = qa.AUDIO
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
CLIPS = [qa._tone(0.7, 300, 0), qa._tone(1.3, 700, 1)]
ENGINE_KW = dict(dtype="float32", max_model_len=256, max_num_batched_tokens=256)
HIDDEN = 64  # the checkpoint's text hidden size


@pytest.fixture(scope="module")
def embeds(qwen2_audio) -> list[np.ndarray]:
    """transformers' audio-tower + projector rows of each clip, (n_i, D)."""
    from transformers import AutoProcessor

    path, model = qwen2_audio
    fe = AutoProcessor.from_pretrained(path).feature_extractor
    out = []
    for clip in CLIPS:
        x = fe(
            clip,
            sampling_rate=qa.SR,
            return_attention_mask=True,
            padding="max_length",
            return_tensors="pt",
        )
        mask = x["attention_mask"]
        with torch.no_grad():
            hidden = model.model.audio_tower(
                x["input_features"], attention_mask=qa._hf_audio_mask(mask)
            ).last_hidden_state
            rows = model.model.multi_modal_projector(hidden)[0]
        after_conv = (int(mask.sum()) - 1) // 2 + 1
        out.append(rows[: (after_conv - 2) // 2 + 1].numpy())
    return out


@pytest.fixture(scope="module")
def llm(qwen2_audio):
    return LLM(qwen2_audio[0], enable_mm_embeds=True, **ENGINE_KW)


def _gen(llm, data) -> list[int]:
    prompt = {"prompt": f"First {AUDIO} then {AUDIO} compare", "multi_modal_data": data}
    [out] = llm.generate(prompt, GREEDY, use_tqdm=False)
    return list(out.outputs[0].token_ids)


def test_audio_embeds_give_the_audio_tokens(llm, embeds):
    want = _gen(llm, {"audio": [(c, qa.SR) for c in CLIPS]})
    assert len(want) == GREEDY.max_tokens
    a, b = embeds
    assert _gen(llm, {"audio": [{"audio_embeds": a}, {"audio_embeds": jnp.asarray(b)}]}) == want
    assert _gen(llm, {"audio": [torch.from_numpy(a), torch.from_numpy(b)]}) == want
    assert _gen(llm, {"audio_embeds": [a, b]}) == want
    # mixed: one clip as audio, one as embeddings
    assert _gen(llm, {"audio": [(CLIPS[0], qa.SR), {"audio_embeds": b}]}) == want
    # (N, n, D) holds N clips of n rows each
    same = _gen(llm, {"audio": {"audio_embeds": torch.from_numpy(np.stack([a, a]))}})
    assert same == _gen(llm, {"audio": [(CLIPS[0], qa.SR)] * 2})


def test_audio_embeds_chat_part(llm, embeds):
    a, _ = embeds
    text = {"type": "text", "text": "Listen."}
    audio = {"type": "audio", "audio": (CLIPS[0], qa.SR)}
    [want] = llm.chat([{"role": "user", "content": [text, audio]}], GREEDY, use_tqdm=False)
    part = {"type": "audio_embeds", "audio_embeds": _b64_npy(a)}
    [got] = llm.chat([{"role": "user", "content": [text, part]}], GREEDY, use_tqdm=False)
    assert got.prompt_token_ids == want.prompt_token_ids
    assert list(got.outputs[0].token_ids) == list(want.outputs[0].token_ids)


def test_audio_embeds_are_checked_and_gated(llm, qwen2_audio, embeds):
    a, _ = embeds
    for bad in (a[:, :-1], np.concatenate([a] * 40), a[None, None]):
        with pytest.raises(ValueError, match=rf"\(n, {HIDDEN}\) with 1 <= n <= 50"):
            _gen(llm, {"audio": [{"audio_embeds": bad}, {"audio_embeds": a}]})
    with pytest.raises(ValueError, match="holds 'audio_embeds' only"):
        _gen(llm, {"audio": [{"audio_embeds": a, "grid": 1}, {"audio_embeds": a}]})
    # the same front end under a config without enable_mm_embeds refuses them
    engine = llm.llm_engine
    fe = engine.audio_frontend()
    off = AudioFrontend(
        fe.model,
        fe._tokenizer,
        fe.path,
        dataclasses.replace(fe.config, enable_mm_embeds=False),
        engine.hf_config,
    )
    prompt = {"prompt": f"{AUDIO}?", "multi_modal_data": {"audio": {"audio_embeds": a}}}
    with pytest.raises(ValueError, match="enable_mm_embeds=True"):
        off.prepare(prompt)
    assert off.prepare({**prompt, "multi_modal_data": {"audio": (CLIPS[0], qa.SR)}})[1]


def _b64_npy(x: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, x)
    return base64.b64encode(buf.getvalue()).decode()


def _b64_torch(x: np.ndarray) -> str:
    buf = io.BytesIO()
    torch.save(torch.from_numpy(x), buf)
    return base64.b64encode(buf.getvalue()).decode()


def test_server_audio_embeds_parts(qwen2_audio, embeds):
    from openai import OpenAI

    from tests.server.live_util import KEY, NAME, live_server

    a, b = embeds
    wav = [qa._tone(0.7, 300, 0), qa._tone(1.3, 700, 1)]

    def ask(client, parts: list[dict]) -> list[int]:
        out = client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "What?"}]}],
            max_tokens=GREEDY.max_tokens,
            temperature=0,
            logprobs=True,
            extra_body={"ignore_eos": True},
        )
        return [t.token for t in out.choices[0].logprobs.content]

    def input_audio(clip: np.ndarray) -> dict:
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, clip, qa.SR, format="WAV", subtype="FLOAT")
        data = base64.b64encode(buf.getvalue()).decode()
        return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}

    with live_server(qwen2_audio[0], enable_mm_embeds=True, **ENGINE_KW) as (_, url):
        client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
        want = ask(client, [input_audio(w) for w in wav])
        assert len(want) == GREEDY.max_tokens
        parts = [
            {"type": "audio_embeds", "audio_embeds": _b64_torch(a)},
            {"type": "audio_embeds", "audio_embeds": {"audio_embeds": _b64_npy(b)}},
        ]
        assert ask(client, parts) == want
        bad = {"type": "audio_embeds", "audio_embeds": _b64_npy(a[:, :7])}
        r = httpx.post(
            f"{url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": NAME, "messages": [{"role": "user", "content": [bad]}]},
            timeout=60,
        )
        assert r.status_code == 400, r.text
        assert f"(n, {HIDDEN})" in r.json()["error"]["message"]
