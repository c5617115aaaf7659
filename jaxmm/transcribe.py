"""Speech to text with a Whisper checkpoint, for audio of any length.

`transcribe(llm, audio, sample_rate)` folds the audio to mono at the model's rate, cuts it
into windows the encoder takes (30 s) at quiet points with `split_audio`, queues every
window as its own request (so they decode as one batch, each with its cross-attention
slot), and joins the texts in order. Windows are independent: no window is conditioned
on the previous one's text.
"""

from __future__ import annotations

import numpy as np

from jaxmm.multimodal.audio import split_audio
from jaxmm.multimodal.audio_inputs import audio_frontend
from jaxmm.sampling_params import SamplingParams


def transcribe(
    llm,
    audio,
    sample_rate: int,
    language: str | None = "en",
    *,
    task: str = "transcribe",
    prompt: str | None = None,
    sampling_params: SamplingParams | None = None,
    max_clip_duration_s: float | None = None,
) -> str:
    """Transcribe (or translate, `task="translate"`) audio; returns the text.

    `audio` is 1-D, or 2-D channels-first or channels-last, at `sample_rate`. `prompt` is
    earlier text the first window is conditioned on. Greedy decoding up to the decoder's
    length unless `sampling_params` says otherwise.
    """
    engine = llm.llm_engine
    fe = audio_frontend(engine)
    if not fe.encoder_decoder:
        raise ValueError(f"{type(fe.model).__name__} is not a transcription (Whisper) model")
    mono = fe.load((np.asarray(audio), sample_rate))
    limit = min(max_clip_duration_s or fe.max_seconds, fe.max_seconds)
    clips = split_audio(mono, fe.sampling_rate, max_clip_duration_s=limit)

    order = []
    try:
        for i, clip in enumerate(clips):
            ids = fe.decoder_prompt(language, task, prompt if i == 0 else None)
            params = sampling_params or SamplingParams(
                temperature=0.0, max_tokens=max(1, fe.max_target_positions - len(ids))
            )
            rid = engine.next_request_id()
            engine.add_request(rid, None, params, prompt_ids=ids, mm=fe.whisper_request(clip))
            order.append(rid)
        texts: dict[str, str] = {}
        while len(texts) < len(order):
            if not engine.has_unfinished_requests():
                raise RuntimeError("the engine stopped before every window was transcribed")
            for out in engine.step():
                if out.finished and out.request_id in order:
                    texts[out.request_id] = out.outputs[0].text
    except BaseException:
        engine.abort_request(order)
        raise
    return " ".join(t.strip() for t in (texts[r] for r in order) if t.strip())
