"""Gemma 4 (E2B shape, random bf16): TTFT for one 10 s audio clip vs transformers.

    python benchmarks/gemma4_audio_ttft.py                             # GPU: gemma-4-E2B shape
    python benchmarks/gemma4_audio_ttft.py --config small --iters 1 --device cpu --seconds 2

The checkpoint is gemma4_ttft.py's (text and vision with google/gemma-4-E2B-it's shapes, its
processor and tokenizer) plus the audio tower transformers' `Gemma4AudioConfig` defaults
describe (E2B's: 12 conformer layers of width 1024, 128 mel bins subsampled 4x in time, so
10 s of audio is 250 soft tokens; chunked local attention of 12 frames with 12 frames of left
context) and `embed_audio`. Weights are random: jaxmm's `load_format="dummy"` in bf16,
`Gemma4ForConditionalGeneration(config)` in bf16 on the same device for transformers.

One JSON line ("gemma4_audio_ttft"): one prompt with one clip (a fresh random clip per timed
run, so no cache serves it), prefix caching off; every piece runs once before it is timed
(compilation and CUDA start-up excluded); medians of --iters runs.
  jaxmm: preprocess_s (mono, resampling check and Gemma4AudioFeatureExtractor's log-mel as the
  audio front end calls them), encoder_s (jitted conformer tower + embed_audio), prefill_s
  (engine steps until the first token, the encoder run done ahead), e2e_s (wall time of
  llm.generate(max_tokens=1): all of it plus hashing, tokenising, placeholder expansion).
  transformers: hf_processor_s (Gemma4Processor: audio + text), hf_model_s (generate of one
  token, synchronised), hf_e2e_s. speedup_vs_hf = hf_e2e_s / e2e_s.

transformers 5.17 (the GPU host) may lack Gemma 4: a missing class is reported in the JSON
("hf_error") and jaxmm's numbers still come out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import gemma4_ttft  # noqa: E402
from benchmarks import ttft_common as tc  # noqa: E402  (sets the JAX memory fraction first)

SR = 16000
PROMPT = "<|im_start|>user\n<|audio|>Transcribe this audio.<|im_end|>\n<|im_start|>assistant\n"
AUDIO = {  # Gemma4AudioConfig overrides per config (E2B: transformers' defaults)
    "gemma-4-e2b": {},
    "small": dict(  # seconds on a CPU: for the smoke test (128 mel bins, as the extractor)
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        subsampling_conv_channels=[128, 8],
        output_proj_dims=48,
    ),
}


def write_checkpoint(name: str, path: str):
    """gemma4_ttft's checkpoint with an audio tower; returns (config, processor or None)."""
    import transformers

    cfg, processor = gemma4_ttft.write_checkpoint(name, path)
    cfg.audio_config = transformers.Gemma4AudioConfig(**AUDIO[name])
    cfg.save_pretrained(path)
    return cfg, processor


def clip(seconds: float, seed: int) -> np.ndarray:
    """Random speech-band noise with a sweep, at 16 kHz (every run its own: no cache hit)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    sweep = 0.3 * np.sin(2 * np.pi * (200 + 300 * rng.random()) * t * (1 + t / seconds))
    return (sweep + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


# ---------------------------------------------------------------------------------------
# jaxmm


def jaxmm_run(llm, audio: np.ndarray, sp) -> dict:
    """One clip: the pieces timed apart (the end-to-end call is `jaxmm_e2e`)."""
    from jaxmm.multimodal.audio_inputs import prepare_audio_prompt

    engine = llm.llm_engine
    runner = engine.runner
    fe = engine.audio_frontend()
    model = runner.model_obj
    if runner._mm_encode is None:
        runner._mm_encode = model.mm_encoder(runner.graphdef)
    # 1. loading and the log-mel, as the audio front end does them
    t0 = time.perf_counter()
    mono = fe.load((audio, SR))
    item = model.mm_audio_features(fe.feature_extractor, mono, fe.sampling_rate, {})
    t1 = time.perf_counter()
    # 2. the tower + embedder (its rows stay on the device: wait for them)
    rows = runner._mm_encode(runner.params, "audio", [item])
    tc.sync_rows(rows)
    t2 = time.perf_counter()
    assert rows[0].shape[0] == model.mm_num_tokens("audio", item)
    # 3. prefill to the first token, from a prepared request (its prep is not timed)
    request = {"prompt": PROMPT, "multi_modal_data": {"audio": (audio, SR)}}
    text, ids, mm = prepare_audio_prompt(engine, request)
    return {
        "preprocess_s": t1 - t0,
        "encoder_s": t2 - t1,
        "prefill_s": tc.prefill_s(engine, text, ids, mm, sp),
        "num_prompt_tokens": len(ids),
        "num_audio_tokens": int(rows[0].shape[0]),
    }


def jaxmm_e2e(llm, audio: np.ndarray, sp) -> float:
    return tc.generate_one_s(
        llm, {"prompt": PROMPT, "multi_modal_data": {"audio": (audio, SR)}}, sp
    )


# ---------------------------------------------------------------------------------------
# transformers


def hf_run(model, processor, audio: np.ndarray, device) -> dict:
    return tc.hf_processor_run(model, processor, device, PROMPT, "input_features", audio=[audio])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="gemma-4-e2b", choices=sorted(AUDIO))
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length")
    tc.add_common_args(ap, max_num_batched_tokens=2048)
    tc.add_workdir_arg(ap)
    args = ap.parse_args(argv)

    import transformers

    missing = [n for n in ("Gemma4Config", "Gemma4AudioConfig") if not hasattr(transformers, n)]
    if missing:  # neither side can read the checkpoint's config: say so, time nothing
        error = f"transformers {transformers.__version__} has no {', '.join(missing)}"
        return tc.error_line("gemma4_audio_ttft", args.config, error)
    path = os.path.join(args.workdir, f"gemma4-audio-{args.config}")
    cfg, processor = write_checkpoint(args.config, path)
    llm = tc.dummy_llm(
        path, 1024, max(args.max_num_batched_tokens, 128), attention_backend=args.attention_backend
    )
    runner = llm.llm_engine.runner
    sp = tc.first_token()

    model, device, hf_error = gemma4_ttft.hf_peer(args, cfg, processor)

    seed = iter(range(1 << 30))  # every run its own clip

    def fresh() -> np.ndarray:
        return clip(args.seconds, next(seed))

    (warm, _, _), (runs, e2e, hf) = tc.time_rounds(  # the warm round compiles: untimed
        args.iters,
        lambda i: jaxmm_run(llm, fresh(), sp),
        lambda i: jaxmm_e2e(llm, fresh(), sp),
        None if model is None else lambda i: hf_run(model, processor, fresh(), device),
    )
    r = {
        "benchmark": "gemma4_audio_ttft",
        "config": args.config,
        "audio_seconds": args.seconds,
        "num_audio_tokens": warm["num_audio_tokens"],
        "num_prompt_tokens": warm["num_prompt_tokens"],
        "iters": args.iters,
        "warm": True,
        "prefix_caching": False,
        **tc.ttft_fields(runs, e2e),
    }
    if hf:
        r.update(tc.hf_fields(hf, r["e2e_s"], device))
    if hf_error:
        r["hf_error"] = hf_error
    r.update(tc.env_fields(runner, python=False))
    print(json.dumps(r), flush=True)
    return [r]


if __name__ == "__main__":
    main()
