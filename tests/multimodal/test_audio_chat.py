"""Audio chat content parts (`input_audio`, `audio_url`) on a tiny random Qwen2-Audio.

The checkpoint is the parity test's (its processor saves Qwen2-Audio's chat template, which
the tokenizer picks up), so a chat renders "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>"
per audio part. A chat must give the same greedy tokens as `generate` with the same
templated text and the decoded audio; URLs obey the MediaPolicy (127.0.0.1 is refused
unless listed in allowed_media_domains); bad payloads are clear errors.
"""

from __future__ import annotations

import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from jaxmm import LLM, SamplingParams
from jaxmm.multimodal.chat import conversation_to_prompt
from jaxmm.multimodal.chat_parts import conversation_to_mm_prompt
from jaxmm.multimodal.fetch import MediaError
from tests.models import test_qwen2_audio as qa

qwen2_audio = qa.qwen2_audio  # the tiny checkpoint fixture
AUDIO = qa.AUDIO
RATE = 24000  # not the model's 16 kHz: both paths resample
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _wav(seconds: float, f0: float, seed: int) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    noise = np.random.default_rng(seed).standard_normal(len(t))
    tone = 0.3 * np.sin(2 * np.pi * f0 * t * (1 + t)) + 0.05 * noise
    buf = io.BytesIO()
    sf.write(buf, tone.astype(np.float32), RATE, format="WAV")
    return buf.getvalue()


def _samples(wav: bytes) -> tuple[np.ndarray, int]:
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return samples, rate


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


WAV_A = _wav(0.7, 300, 0)
WAV_B = _wav(1.3, 700, 1)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path != "/b.wav":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "audio/wav")
        self.send_header("Content-Length", str(len(WAV_B)))
        self.end_headers()
        self.wfile.write(WAV_B)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def llm(qwen2_audio):
    return LLM(qwen2_audio[0], dtype="float32", max_model_len=256, max_num_batched_tokens=256)


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _input_audio(wav: bytes, **extra) -> dict:
    return {"type": "input_audio", "input_audio": {"data": _b64(wav), "format": "wav"}, **extra}


def _ids(out) -> list[int]:
    return list(out.outputs[0].token_ids)


def test_input_audio_chat_matches_generate(llm):
    tok = llm.get_tokenizer()
    [chat] = llm.chat(
        _user({"type": "text", "text": "Listen."}, _input_audio(WAV_A)),
        GREEDY,
        use_tqdm=False,
    )
    # Qwen2-Audio's template: a default system turn, then "Audio 1: <placeholder>\n" per part
    text = tok.apply_chat_template(
        [{"role": "user", "content": f"Listen.Audio 1: {AUDIO}\n"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "<|im_start|>system" in text
    # chat prompts are tokenized without special tokens: the template holds them
    ids = tok(text, add_special_tokens=False).input_ids
    [ref] = llm.generate(
        {"prompt": text, "prompt_token_ids": ids, "multi_modal_data": {"audio": _samples(WAV_A)}},
        GREEDY,
        use_tqdm=False,
    )
    assert chat.prompt_token_ids == ref.prompt_token_ids
    audio_id = tok.convert_tokens_to_ids("<|AUDIO|>")
    assert chat.prompt_token_ids.count(audio_id) > 1  # expanded to the item's rows
    assert _ids(chat) == _ids(ref) and len(_ids(chat)) == GREEDY.max_tokens

    # without a template that reads parts, placeholders join the text parts on new lines
    plain = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    [plain_out] = llm.chat(
        _user({"type": "text", "text": "Listen."}, _input_audio(WAV_A)),
        GREEDY,
        use_tqdm=False,
        chat_template=plain,
        add_generation_prompt=False,
    )
    text = f"<|user|>Listen.\n{AUDIO}<|end|>"
    [ref] = llm.generate(
        {"prompt": text, "multi_modal_data": {"audio": _samples(WAV_A)}}, GREEDY, use_tqdm=False
    )
    # generate() tokenizes with special tokens (BOS here); the audio rows are the same
    assert ref.prompt_token_ids == [tok.bos_token_id, *plain_out.prompt_token_ids]


def test_audio_url_data_url_and_order_of_parts(llm):
    engine = llm.llm_engine
    data_url = "data:audio/wav;base64," + _b64(WAV_B)
    prompt = conversation_to_mm_prompt(
        engine,
        _user(
            {"type": "text", "text": "first"},
            _input_audio(WAV_A),
            {"type": "text", "text": "then"},
            {"type": "audio_url", "audio_url": {"url": data_url}},
        ),
    )
    assert prompt["prompt"].index("first") < prompt["prompt"].index("Audio 1:")
    assert prompt["prompt"].index("Audio 1:") < prompt["prompt"].index("then")
    assert prompt["prompt"].index("then") < prompt["prompt"].index("Audio 2:")
    a, b = prompt["multi_modal_data"]["audio"]
    np.testing.assert_array_equal(a[0], _samples(WAV_A)[0])
    np.testing.assert_array_equal(b[0], _samples(WAV_B)[0])
    assert a[1] == b[1] == RATE

    # a data: URL and the same bytes as input_audio give the same tokens
    outs = llm.chat(
        [
            _user({"type": "audio_url", "audio_url": {"url": data_url}}),
            _user({"type": "audio_url", "audio_url": data_url}),  # a bare string too
            _user(_input_audio(WAV_B)),
        ],
        GREEDY,
        use_tqdm=False,
    )
    assert _ids(outs[0]) == _ids(outs[1]) == _ids(outs[2])
    assert outs[0].prompt_token_ids == outs[2].prompt_token_ids


def test_audio_url_over_http_follows_the_media_policy(llm, qwen2_audio, server):
    url = f"{server}/b.wav"
    with pytest.raises(MediaError) as info:  # loopback: refused unless listed
        llm.chat(_user({"type": "audio_url", "audio_url": {"url": url}}), GREEDY, use_tqdm=False)
    assert "loopback" in str(info.value)

    allowed = LLM(
        qwen2_audio[0],
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=256,
        allowed_media_domains=["127.0.0.1"],
        limit_mm_per_prompt={"audio": 1},
    )
    [out] = allowed.chat(
        _user({"type": "audio_url", "audio_url": {"url": url}}), GREEDY, use_tqdm=False
    )
    [ref] = llm.chat(_user(_input_audio(WAV_B)), GREEDY, use_tqdm=False)
    assert _ids(out) == _ids(ref)

    two = _user(_input_audio(WAV_A), {"type": "audio_url", "audio_url": {"url": url}})
    with pytest.raises(ValueError, match="limit_mm_per_prompt"):
        allowed.chat(two, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="limit_mm_per_prompt"):  # generate() too
        allowed.generate(
            {"prompt": f"{AUDIO}{AUDIO}", "multi_modal_data": {"audio": [_samples(WAV_A)] * 2}},
            GREEDY,
            use_tqdm=False,
        )


def test_uuid_parts_are_served_from_the_cache(llm):
    part = _input_audio(WAV_A, uuid="clip-a")
    [first] = llm.chat(_user(part), GREEDY, use_tqdm=False)
    cached = {"type": "input_audio", "input_audio": None, "uuid": "clip-a"}
    [again] = llm.chat(_user(cached), GREEDY, use_tqdm=False)
    assert _ids(again) == _ids(first)
    assert again.prompt_token_ids == first.prompt_token_ids
    url_part = {"type": "audio_url", "audio_url": {"url": None}, "uuid": "clip-a"}
    [by_url] = llm.chat(_user(url_part), GREEDY, use_tqdm=False)
    assert _ids(by_url) == _ids(first)

    with pytest.raises(ValueError, match="not in the encoder cache"):
        llm.chat(_user({**cached, "uuid": "never-sent"}), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="must come with the uuid"):
        llm.chat(_user({"type": "input_audio", "input_audio": None}), GREEDY, use_tqdm=False)


def test_bad_audio_parts_are_clear_errors(llm, tmp_path):
    def chat(part):
        llm.chat(_user(part), GREEDY, use_tqdm=False)

    bad = {"type": "input_audio", "input_audio": {"data": "not base64 !!", "format": "wav"}}
    with pytest.raises(MediaError, match="not valid base64") as info:
        chat(bad)
    assert info.value.status == 400
    with pytest.raises(ValueError, match="format 'xyz' is not supported"):
        chat({"type": "input_audio", "input_audio": {"data": _b64(WAV_A), "format": "xyz"}})
    with pytest.raises(MediaError, match="could not decode"):
        chat({"type": "input_audio", "input_audio": {"data": _b64(b"\x00" * 64), "format": "mp3"}})
    with pytest.raises(ValueError, match="hears at most 2 s"):  # the encoder's window
        chat(_input_audio(_wav(2.5, 300, 3)))
    with pytest.raises(MediaError, match="data:"):
        chat({"type": "audio_url", "audio_url": {"url": "data:audio/wav,no-base64"}})
    path = tmp_path / "a.wav"
    path.write_bytes(WAV_A)
    with pytest.raises(MediaError, match="allowed_local_media_path"):  # file:// off by default
        chat({"type": "audio_url", "audio_url": {"url": path.as_uri()}})
    with pytest.raises(ValueError, match="'image_url' is not supported by Qwen2Audio"):
        chat({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})


def test_models_without_audio_refuse_audio_parts():
    conv = _user({"type": "text", "text": "hi"}, _input_audio(WAV_A))

    class TextOnly:
        pass

    text_only = SimpleNamespace(runner=SimpleNamespace(model_obj=TextOnly()))
    with pytest.raises(ValueError, match="'input_audio' needs a multimodal model"):
        conversation_to_prompt(text_only, conv)

    class VisionOnly:
        is_multimodal = True
        mm_modalities = ("image",)

    front = SimpleNamespace(model=VisionOnly(), tokenizer=None)
    vision = SimpleNamespace(
        runner=SimpleNamespace(model_obj=VisionOnly()),
        is_multimodal=True,
        mm_frontend=lambda: front,
    )
    with pytest.raises(
        ValueError, match="'input_audio' is not supported by VisionOnly: it is audio"
    ):
        conversation_to_prompt(vision, conv)
