"""POST /v1/audio/transcriptions: OpenAI speech-to-text over a multipart upload.

Only Whisper and Voxtral checkpoints (`architectures` in TRANSCRIPTION_ARCHITECTURES)
transcribe; any other model gets a 400. For Whisper, the upload is decoded in the thread pool
(`jaxmm.multimodal.audio.decode_audio_bytes`, duration capped by the media policy), then
handed to the hook `jaxmm.multimodal.inputs.transcription_prompt(engine, samples,
sample_rate, language=..., prompt=...) -> (text, prompt_ids, mm)`, which the Whisper front
end provides: it builds the decoder prompt (<|startoftranscript|><|lang|><|transcribe|>
<|notimestamps|>) and the audio features. The result is generated like any request. While
that hook is missing, a Whisper server answers 501 saying so. Voxtral (an audio-in-LLM
model) gets its own transcription request from the same hook, per 30 s window too.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, PlainTextResponse

from jaxmm.sampling_params import SamplingParams
from jaxmm.server.errors import APIError, api_errors
from jaxmm.server.protocol import random_id
from jaxmm.server.state import ServerState, check_model, get_state, run_blocking
from jaxmm.server.streaming import cancel_on_disconnect
from jaxmm.server.submit import Prompt, collect, submit

router = APIRouter()

TRANSCRIPTION_ARCHITECTURES = frozenset(
    {"WhisperForConditionalGeneration", "VoxtralForConditionalGeneration"}
)
_FORMATS = ("json", "text", "verbose_json")


def supports_transcription(hf_config) -> bool:
    archs = getattr(hf_config, "architectures", None) or []
    if "Gemma4ForConditionalGeneration" in archs:  # the sizes with an audio tower
        return getattr(hf_config, "audio_config", None) is not None
    return any(a in TRANSCRIPTION_ARCHITECTURES for a in archs)


def _transcription_prompts(
    state: ServerState, data: bytes, language: str | None, prompt: str | None
) -> tuple[list[Prompt], float]:
    """Blocking: audio file bytes -> (one Whisper prompt per 30 s window, duration in s).

    Long audio is cut at quiet points by `split_audio`; the windows are transcribed as one
    batch and their texts joined in order.
    """
    from jaxmm.multimodal.audio import decode_audio_bytes, normalize_channels, split_audio
    from jaxmm.multimodal.fetch import MediaPolicy

    samples, sample_rate = decode_audio_bytes(data, MediaPolicy().max_audio_duration_s)
    duration = samples.shape[-1] / sample_rate
    samples = normalize_channels(samples, want_mono=True)
    return [
        _window_prompt(state, chunk, sample_rate, language, prompt)
        for chunk in split_audio(samples, sample_rate)
    ], duration


def _window_prompt(state, samples, sample_rate, language, prompt) -> Prompt:
    try:
        from jaxmm.multimodal.inputs import transcription_prompt
    except ImportError:
        raise APIError(
            501,
            "transcription needs the Whisper front end "
            "(jaxmm.multimodal.inputs.transcription_prompt), which this build does not have",
        ) from None
    engine = state.client.engine
    if getattr(engine, "prepares_remotely", False):  # the engine's front end does it there
        from jaxmm.multimodal.interface import PendingPrompt

        kwargs = {"language": language, "prompt": prompt}
        return Prompt(None, [], PendingPrompt("transcription", (samples, sample_rate), kwargs))
    text, ids, mm = transcription_prompt(
        engine, samples, sample_rate, language=language, prompt=prompt
    )
    return Prompt(text, list(ids), mm)


def _field(form, name: str, default: str | None = None) -> str | None:
    value = form.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise APIError(400, f"{name} must be a form field, not a file", param=name)
    return value


@router.post("/v1/audio/transcriptions")
@api_errors
async def create_transcription(request: Request):
    arrival = time.monotonic()
    state = get_state(request)
    try:
        form = await request.form(max_files=1, max_fields=32)
    except Exception as e:  # malformed multipart, too many parts, wrong content type
        raise APIError(400, f"expected a multipart/form-data body: {e}") from None
    check_model(state, _field(form, "model"))
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise APIError(400, "file: an audio file is required", param="file")
    fmt = _field(form, "response_format", "json")
    if fmt not in _FORMATS:
        raise APIError(
            400, f"response_format must be one of {_FORMATS}, got {fmt!r}", param="response_format"
        )
    try:
        temperature = float(_field(form, "temperature", "0") or 0)
    except ValueError:
        raise APIError(400, "temperature must be a number", param="temperature") from None
    if not supports_transcription(state.client.hf_config):
        raise APIError(
            400,
            "this model does not support transcription (serve a Whisper checkpoint for "
            "/v1/audio/transcriptions)",
            param="model",
            code="model_not_supported",
        )
    data = await upload.read()
    language = _field(form, "language")
    prompts, duration = await run_blocking(
        state, _transcription_prompts, state, data, language, _field(form, "prompt")
    )
    params = SamplingParams(temperature=temperature, max_tokens=None)
    sub = await submit(state, random_id("trsc"), prompts, params, arrival)
    outs = await cancel_on_disconnect(request, collect(sub))
    text = " ".join(o.outputs[0].text.strip() for o in outs).strip()
    if fmt == "text":
        return PlainTextResponse(text)
    if fmt == "verbose_json":
        return JSONResponse(
            {
                "task": "transcribe",
                "language": language,
                "duration": duration,
                "text": text,
                "segments": [],
            }
        )
    return JSONResponse({"text": text})
