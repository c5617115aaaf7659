"""Time to first token, a video with its audio track: jaxmm vs transformers on a random-weight
Qwen2.5-Omni thinker (use_audio_in_video).

    python benchmarks/omni_av_ttft.py --frames 16 --size 336                    # GPU
    python benchmarks/omni_av_ttft.py --config small --frames 4 --size 56 --iters 1 --device cpu

The checkpoint is a `Qwen2_5OmniThinkerForConditionalGeneration` config.json at the
Qwen2.5-Omni-7B shape (audio tower: 32 layers of width 1280, 128 mel bins, 200-frame chunks;
Qwen2.5-VL vision tower: 32 blocks of width 1280, windowed; Qwen2.5-7B decoder of width
3584; the shapes are written here, not read from the hub) with the decoder cut to
`--layers` layers, one preprocessor_config.json holding the image processor's and the
feature extractor's settings as the released checkpoint's does, and a small tokenizer with
Omni's special tokens. Weights: jaxmm's `load_format="dummy"` and the transformers model
built from the same config, both bf16 on the same device.

One prompt: a user turn with `<|vision_bos|><|VIDEO|><|vision_eos|>` and a question; the
video is `--frames` random frames of `--size` pixels at `--fps`, its track a clip of the
same length (fresh frames and audio every run, so no cache serves them); prefix caching is
off. The video's placeholder becomes the video's and the audio's tokens interleaved in
`seconds_per_chunk` chunks. Timed (median of `--iters`, after one untimed pass):
- `e2e_s`: `LLM.generate` with one new token, `mm_processor_kwargs={"use_audio_in_video":
  True}` (front end: frames through the video processor, log-mel features, the span; both
  towers; the prefill);
- `hf_e2e_s`: the feature extractor, the image processor on each frame (what
  `Qwen2_5OmniProcessor`'s video processor computes for Qwen2-VL-style patches), the
  interleaved placeholder, the tokenizer and `generate(max_new_tokens=1,
  use_audio_in_video=True)`, synchronised.
speedup_vs_hf = hf_e2e_s / e2e_s. One JSON line per run, "benchmark": "omni_av_ttft".
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import ttft_common as tc  # noqa: E402  (sets the JAX memory fraction first)
from benchmarks import vlm_ttft  # noqa: E402

SR = 16000
OMNI_SPECIALS = [
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
]
PROMPT = (
    "<|im_start|>user\n<|vision_bos|><|VIDEO|><|vision_eos|>What happens, and what is "
    "said?<|im_end|>\n<|im_start|>assistant\n"
)
_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
CONFIGS = {
    "omni-7b": dict(
        audio=dict(
            num_mel_bins=128,
            encoder_layers=32,
            encoder_attention_heads=20,
            encoder_ffn_dim=5120,
            d_model=1280,
            output_dim=3584,
            n_window=100,
            max_source_positions=1500,
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        text=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            rope_parameters=_ROPE,
        ),
        mel=128,
        patch=14,
    ),
    "small": dict(  # seconds on a CPU: for the smoke test
        audio=dict(
            num_mel_bins=16,
            encoder_layers=2,
            encoder_attention_heads=4,
            encoder_ffn_dim=64,
            d_model=32,
            output_dim=64,
            n_window=20,
            max_source_positions=100,
        ),
        vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=48,
            num_heads=4,
            out_hidden_size=64,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,
            fullatt_block_indexes=[1],
        ),
        text=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            rope_parameters=dict(_ROPE, mrope_section=[2, 3, 3]),
        ),
        mel=16,
        patch=4,
    ),
}


def omni_classes():
    """(thinker config class, thinker model class) of the installed transformers, or None."""
    import transformers

    cfg = getattr(transformers, "Qwen2_5OmniThinkerConfig", None)
    model = getattr(transformers, "Qwen2_5OmniThinkerForConditionalGeneration", None)
    return None if cfg is None or model is None else (cfg, model)


def thinker_checkpoint(path: str, classes, needs: str, specials: list[str], shape: dict,
                       layers: int, token_ids: dict[str, str], **kw):  # fmt: skip
    """config.json of an Omni thinker (`classes`: its config and model class, None where
    this transformers lacks them, which ends the script naming `needs`) with its decoder cut to
    `layers`, and the tokenizer with `specials`; `token_ids` maps config fields to the
    tokens they name. Returns (config, tokenizer). Shared by qwen3_omni_audio_ttft.py."""
    import transformers

    if classes is None:
        sys.exit(
            f"transformers {transformers.__version__} has no {needs}: jaxmm reads multimodal "
            "configs through it"
        )
    os.makedirs(path, exist_ok=True)
    tok = vlm_ttft.make_tokenizer(path)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.save_pretrained(path)
    ids = {t: tok.convert_tokens_to_ids(t) for t in vlm_ttft.SPECIALS + specials}
    text = dict(
        shape["text"],
        num_hidden_layers=layers,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    cfg = classes[0](
        audio_config=shape["audio"],
        vision_config=shape["vision"],
        text_config=text,
        **{field: ids[t] for field, t in token_ids.items()},
        **kw,
    )
    cfg.architectures = [classes[1].__name__]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(path)
    return cfg, tok


def write_checkpoint(name: str, layers: int, path: str):
    """config.json + one preprocessor_config.json (image processor and feature extractor,
    as the released checkpoint keeps them) + tokenizer."""
    import transformers

    shape = CONFIGS[name]
    token_ids = dict(
        audio_token_index="<|AUDIO|>",
        image_token_index="<|IMAGE|>",
        video_token_index="<|VIDEO|>",
        audio_start_token_id="<|audio_bos|>",
        audio_end_token_id="<|audio_eos|>",
        vision_start_token_id="<|vision_bos|>",
        vision_end_token_id="<|vision_eos|>",
    )
    needs = "Qwen2_5OmniThinkerConfig (added in 4.51)"
    cfg, tok = thinker_checkpoint(
        path, omni_classes(), needs, OMNI_SPECIALS, shape, layers, token_ids
    )
    fe = transformers.WhisperFeatureExtractor(feature_size=shape["mel"])
    pre = dict(
        vlm_ttft.PREPROCESSOR,
        patch_size=shape["patch"],
        **{k: v for k, v in fe.to_dict().items() if k not in ("mel_filters", "window")},
    )
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f, indent=1)
    return cfg, tok, fe


def image_processor(path: str):
    """transformers' PIL Qwen2-VL image processor (5.20+), else its numpy one (older)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as cls,
        )
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
            Qwen2VLImageProcessor as cls,
        )
    return cls.from_pretrained(path)


def media(frames: int, size: int, fps: float, rs: np.random.RandomState):
    """Fresh blocky random frames (T, size, size, 3) and a clip of the video's length."""
    from PIL import Image

    video = np.stack(
        [
            np.asarray(
                Image.fromarray(
                    rs.randint(0, 255, (size // 8 + 1, size // 8 + 1, 3), np.uint8)
                ).resize((size, size), Image.NEAREST)
            )
            for _ in range(frames)
        ]
    )
    t = np.arange(int(frames / fps * SR)) / SR
    audio = 0.3 * np.sin(2 * np.pi * 440 * t * (1 + t)) + 0.05 * rs.standard_normal(len(t))
    return video, audio.astype(np.float32)


def jaxmm_time(llm, video, audio, fps: float, sp) -> dict:
    prompt = {
        "prompt": PROMPT,
        "multi_modal_data": {"video": (video, {"fps": fps}), "audio": (audio, SR)},
        "mm_processor_kwargs": {"use_audio_in_video": True},
    }
    t0 = time.perf_counter()
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    return dict(e2e_s=time.perf_counter() - t0, tokens=len(out.prompt_token_ids))


def hf_time(model, tok, fe, ip, video, audio, fps: float, device) -> dict:
    import torch

    from jaxmm.models.qwen2_5_omni import interleaved_chunks
    from jaxmm.models.qwen2_audio import audio_output_lengths  # the processor's count

    c = model.config
    t0 = time.perf_counter()
    feats = fe(
        audio,
        sampling_rate=SR,
        padding="max_length",
        return_attention_mask=True,
        return_tensors="pt",
    )
    n_audio = int(audio_output_lengths(int(feats["attention_mask"].sum()))[1])
    per_frame = ip(images=list(video), return_tensors="np")
    _, gh, gw = per_frame["image_grid_thw"][0]
    p, tp = ip.patch_size, ip.temporal_patch_size
    px = per_frame["pixel_values"].reshape(len(video), gh * gw, 3, tp, p, p)[:, :, :, 0]
    t = len(video) // tp
    px = px.reshape(t, tp, gh * gw, 3, p, p).transpose(0, 2, 3, 1, 4, 5).reshape(t * gh * gw, -1)
    seconds = tp / fps
    m = ip.merge_size
    times = np.repeat(np.arange(t) * seconds * c.position_id_per_seconds, gh * gw // m**2)
    per_chunk = int(c.position_id_per_seconds * c.seconds_per_chunk)
    span = "<|audio_bos|>"
    for kind, a, b in interleaved_chunks(times, n_audio, per_chunk):
        span += ("<|VIDEO|>" if kind == "video" else "<|AUDIO|>") * (b - a)
    ids = tok(PROMPT.replace("<|VIDEO|>", span + "<|audio_eos|>"), return_tensors="pt")
    inputs = dict(
        input_ids=ids["input_ids"].to(device),
        attention_mask=ids["attention_mask"].to(device),
        input_features=feats["input_features"].to(device, torch.bfloat16),
        feature_attention_mask=feats["attention_mask"].to(device),
        pixel_values_videos=torch.tensor(px).to(device, torch.bfloat16),
        video_grid_thw=torch.tensor([[t, gh, gw]], device=device),
        video_second_per_grid=torch.tensor([seconds], device=device),
        use_audio_in_video=True,
    )
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)
    tc.cuda_sync(device)
    return dict(hf_e2e_s=time.perf_counter() - t0, hf_tokens=int(ids["input_ids"].shape[1]))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="omni-7b", choices=sorted(CONFIGS))
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (the towers are whole)")
    ap.add_argument("--frames", type=int, nargs="+", default=[16])
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--fps", type=float, default=2.0)
    tc.add_common_args(ap, max_num_batched_tokens=4096, attention_backend=False)
    tc.add_workdir_arg(ap)
    args = ap.parse_args(argv)

    path = os.path.join(args.workdir, f"qwen2.5-omni-{args.config}-{args.layers}l")
    cfg, tok, fe = write_checkpoint(args.config, args.layers, path)
    llm = tc.dummy_llm(path, 8192, args.max_num_batched_tokens)
    sp = tc.first_token()
    model = device = ip = None
    if not args.no_hf:
        device = tc.torch_device(args.device)
        ip = image_processor(path)
        model = tc.build_hf(omni_classes()[1], cfg, device)
    rs = np.random.RandomState(0)
    med = tc.median

    def rounds(frames: int):
        """Fresh frames and audio every round, the same for both sides; the first round,
        untimed, compiles and plans."""

        @functools.cache
        def fresh(i):
            return media(frames, args.size, args.fps, rs)

        def theirs(i):
            return hf_time(model, tok, fe, ip, *fresh(i), args.fps, device)

        return tc.time_rounds(
            args.iters,
            lambda i: jaxmm_time(llm, *fresh(i), args.fps, sp),
            None if model is None else theirs,
        )[1]

    results = []
    for frames in args.frames:
        ours, hf = rounds(frames)
        r = {
            "benchmark": "omni_av_ttft",
            "config": args.config,
            "decoder_layers": args.layers,
            "architecture": "Qwen2_5OmniThinkerForConditionalGeneration",
            "frames": frames,
            "size": args.size,
            "fps": args.fps,
            "num_prompt_tokens": ours[0]["tokens"],
            "iters": args.iters,
            "warm": True,  # one untimed pass per shape first: compile / start-up excluded
            "e2e_s": med([x["e2e_s"] for x in ours]),
        }
        if hf:
            r["hf_e2e_s"] = med([x["hf_e2e_s"] for x in hf])
            r["hf_num_prompt_tokens"] = hf[0]["hf_tokens"]  # the same layout: equal counts
            r["speedup_vs_hf"] = round(r["hf_e2e_s"] / r["e2e_s"], 3)
            r["hf_device"] = str(device)
            r["hf_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
            r["hf_image_processor"] = type(ip).__name__
        r.update(tc.env_fields())
        print(json.dumps(r), flush=True)
        results.append(r)
    return results


if __name__ == "__main__":
    main()
