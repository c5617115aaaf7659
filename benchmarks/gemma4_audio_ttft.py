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
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import gemma4_ttft, vlm_ttft  # noqa: E402

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
    vlm_ttft._sync(rows)
    t2 = time.perf_counter()
    assert rows[0].shape[0] == model.mm_num_tokens("audio", item)
    # 3. prefill to the first token, from a prepared request (its prep is not timed)
    request = {"prompt": PROMPT, "multi_modal_data": {"audio": (audio, SR)}}
    text, ids, mm = prepare_audio_prompt(engine, request)
    engine.reset_mm_cache()
    for it in mm.items:  # its encoder run is not prefill: done ahead
        entry = engine.encoder_cache.allocate(it.cache_key, it.end - it.start, "bench")
        runner.encode([(it.modality, it.data, entry.rows)])
        entry.ready = True
        engine.encoder_cache.release(it.cache_key, "bench")
    vlm_ttft._sync([runner.encoder_cache])
    rid = engine.next_request_id()
    engine.add_request(rid, text, sp, prompt_ids=ids, mm=mm)
    t3 = time.perf_counter()
    first = None
    while first is None:
        for out in engine.step():
            if out.request_id == rid and out.outputs[0].token_ids:
                first = out
    t4 = time.perf_counter()
    while engine.has_unfinished_requests():  # max_tokens=1: already done
        engine.step()
    return {
        "preprocess_s": t1 - t0,
        "encoder_s": t2 - t1,
        "prefill_s": t4 - t3,
        "num_prompt_tokens": len(ids),
        "num_audio_tokens": int(rows[0].shape[0]),
    }


def jaxmm_e2e(llm, audio: np.ndarray, sp) -> float:
    request = {"prompt": PROMPT, "multi_modal_data": {"audio": (audio, SR)}}
    t0 = time.perf_counter()
    outs = llm.generate([request], sp, use_tqdm=False)
    t1 = time.perf_counter()
    assert len(outs[0].outputs[0].token_ids) == 1
    return t1 - t0


# ---------------------------------------------------------------------------------------
# transformers


def hf_run(model, processor, audio: np.ndarray, device) -> dict:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    out = processor(text=PROMPT, audio=[audio], return_tensors="pt")
    inputs = {k: v.to(device) for k, v in out.items() if hasattr(v, "to")}
    inputs["input_features"] = inputs["input_features"].to(torch.bfloat16)
    sync()
    t1 = time.perf_counter()
    with torch.inference_mode():
        gen = model.generate(
            **inputs, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    sync()
    t2 = time.perf_counter()
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 1
    return {"hf_processor_s": t1 - t0, "hf_model_s": t2 - t1}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="gemma-4-e2b", choices=sorted(AUDIO))
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default=None, help="torch device for transformers (cuda / cpu)")
    ap.add_argument("--no-hf", action="store_true", help="time jaxmm only")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxmm-bench"))
    args = ap.parse_args(argv)

    import jax
    import torch
    import transformers

    from jaxmm import LLM, SamplingParams

    missing = [n for n in ("Gemma4Config", "Gemma4AudioConfig") if not hasattr(transformers, n)]
    if missing:  # neither side can read the checkpoint's config: say so, time nothing
        r = {
            "benchmark": "gemma4_audio_ttft",
            "config": args.config,
            "error": f"transformers {transformers.__version__} has no {', '.join(missing)}",
        }
        print(json.dumps(r), flush=True)
        return [r]
    path = os.path.join(args.workdir, f"gemma4-audio-{args.config}")
    cfg, processor = write_checkpoint(args.config, path)
    llm = LLM(
        path,
        dtype="bfloat16",
        max_model_len=1024,
        max_num_seqs=4,
        max_num_batched_tokens=max(args.max_num_batched_tokens, 128),
        kv_cache_memory_bytes=1 << 30,
        enable_prefix_caching=False,
        attention_backend=args.attention_backend,
        load_format="dummy",
    )
    runner = llm.llm_engine.runner
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    model = device = None
    hf_error = None if processor is not None else "Gemma4Processor unavailable"
    if not args.no_hf and processor is not None:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            torch.manual_seed(0)
            with torch.device(device):
                model = transformers.Gemma4ForConditionalGeneration._from_config(
                    cfg, dtype=torch.bfloat16
                ).eval()
        except (AttributeError, ImportError, OSError, TypeError, ValueError) as e:
            hf_error = f"transformers {transformers.__version__}: {type(e).__name__}: {e}"
            model = None

    seed = iter(range(1 << 30))
    warm = jaxmm_run(llm, clip(args.seconds, next(seed)), sp)  # compiles: untimed
    jaxmm_e2e(llm, clip(args.seconds, next(seed)), sp)
    if model is not None:
        hf_run(model, processor, clip(args.seconds, next(seed)), device)
    runs, e2e, hf = [], [], []
    for _ in range(args.iters):
        runs.append(jaxmm_run(llm, clip(args.seconds, next(seed)), sp))
        e2e.append(jaxmm_e2e(llm, clip(args.seconds, next(seed)), sp))
        if model is not None:
            hf.append(hf_run(model, processor, clip(args.seconds, next(seed)), device))
    med = vlm_ttft._median
    r = {
        "benchmark": "gemma4_audio_ttft",
        "config": args.config,
        "audio_seconds": args.seconds,
        "num_audio_tokens": warm["num_audio_tokens"],
        "num_prompt_tokens": warm["num_prompt_tokens"],
        "iters": args.iters,
        "warm": True,
        "prefix_caching": False,
        "preprocess_s": med([x["preprocess_s"] for x in runs]),
        "encoder_s": med([x["encoder_s"] for x in runs]),
        "prefill_s": med([x["prefill_s"] for x in runs]),
        "e2e_s": med(e2e),
    }
    r["other_s"] = round(r["e2e_s"] - r["preprocess_s"] - r["encoder_s"] - r["prefill_s"], 4)
    if hf:
        r["hf_processor_s"] = med([x["hf_processor_s"] for x in hf])
        r["hf_model_s"] = med([x["hf_model_s"] for x in hf])
        r["hf_e2e_s"] = med([x["hf_processor_s"] + x["hf_model_s"] for x in hf])
        r["speedup_vs_hf"] = round(r["hf_e2e_s"] / r["e2e_s"], 3)
        r["hf_device"] = str(device)
    if hf_error:
        r["hf_error"] = hf_error
    r.update(
        {
            "dtype": np.dtype(runner.dtype).name,
            "attention_backend": runner.backend,
            "max_num_batched_tokens": runner.max_num_batched_tokens,
            "device": str(jax.devices()[0].device_kind),
            "backend": jax.default_backend(),
            "jax_version": jax.__version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "date": time.strftime("%Y-%m-%d"),
        }
    )
    print(json.dumps(r), flush=True)
    return [r]


if __name__ == "__main__":
    main()
