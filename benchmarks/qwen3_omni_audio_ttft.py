"""Time to first token, one audio clip: jaxmm vs transformers on a random-weight Qwen3-Omni thinker.

    python benchmarks/qwen3_omni_audio_ttft.py --seconds 5 30                      # GPU
    python benchmarks/qwen3_omni_audio_ttft.py --config small --seconds 2 --iters 1 --device cpu

The checkpoint is a `Qwen3OmniMoeThinkerForConditionalGeneration` config.json at a
Qwen3-Omni-30B-A3B-like shape (audio tower: 32 layers of width 1280, 128 mel bins,
100-frame chunks through three Conv2d of 480 channels, 800-frame attention windows; MoE
decoder of width 2048 with 128 experts, top 8; the shapes are written here, not read from
the hub) with the decoder cut to `--layers` layers so that both engines' random bf16
weights fit on one GPU. Weights: jaxmm's `load_format="dummy"` and the transformers model
built from the same config in bf16 on the same device.

Timed per clip length (median of `--iters`, after one untimed pass):
- `e2e_s`: `LLM.generate` of "<audio> Describe it." with one new token (front end: log-mel
  features, placeholder expansion; the audio tower; the prefill);
- `encoder_s`: jaxmm's audio tower alone on the prepared features (rows on the device);
- `hf_e2e_s`: the feature extractor + tokenizer + `generate(max_new_tokens=1)`;
- `hf_encoder_s`: transformers' `get_audio_features` alone (its MoE experts through
  `--hf-experts`, grouped_mm by default where this transformers has it, else eager).
One JSON line per clip length, "benchmark": "qwen3_omni_audio_ttft". jaxmm reads this
config through transformers: one without Qwen3-Omni (before 4.57) makes the script exit
saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import ttft_common as tc  # noqa: E402  (sets the JAX memory fraction first)
from benchmarks.omni_av_ttft import thinker_checkpoint  # noqa: E402

SR = 16000
AUDIO_SPECIALS = ["<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"]
PROMPT = "<|audio_start|><|audio_pad|><|audio_end|> Describe it."
_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [24, 20, 20]}
CONFIGS = {
    "omni-30b-a3b": dict(
        audio=dict(
            num_mel_bins=128,
            encoder_layers=32,
            encoder_attention_heads=20,
            encoder_ffn_dim=5120,
            d_model=1280,
            output_dim=2048,
            n_window=50,
            n_window_infer=800,
            downsample_hidden_size=480,
            max_source_positions=1500,
        ),
        vision=dict(
            depth=27,
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
        ),
        text=dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=768,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
            max_position_embeddings=65536,
            rope_parameters=dict(_ROPE, interleaved=True),
        ),
    ),
    "small": dict(  # seconds on a CPU: for the smoke test
        audio=dict(
            num_mel_bins=128,
            encoder_layers=2,
            encoder_attention_heads=4,
            encoder_ffn_dim=64,
            d_model=32,
            output_dim=64,
            n_window=50,
            n_window_infer=800,
            downsample_hidden_size=8,
            max_source_positions=1500,
        ),
        vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=48,
            num_heads=4,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        text=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            max_position_embeddings=8192,
            rope_parameters=dict(_ROPE, mrope_section=[2, 3, 3], interleaved=True),
        ),
    ),
}


def omni_classes():
    """(thinker config class, thinker model class) of the installed transformers, or None."""
    import transformers

    cfg = getattr(transformers, "Qwen3OmniMoeThinkerConfig", None)
    model = getattr(transformers, "Qwen3OmniMoeThinkerForConditionalGeneration", None)
    return None if cfg is None or model is None else (cfg, model)


def write_checkpoint(name: str, layers: int, path: str):
    """config.json + the feature extractor's preprocessor_config.json + tokenizer."""
    import transformers

    shape = CONFIGS[name]
    token_ids = dict(
        audio_token_id="<|audio_pad|>",
        image_token_id="<|image_pad|>",
        video_token_id="<|video_pad|>",
        audio_start_token_id="<|audio_start|>",
        vision_start_token_id="<|vision_start|>",
        vision_end_token_id="<|vision_end|>",
    )
    needs = "Qwen3OmniMoeThinkerConfig (added in 4.57)"
    cfg, tok = thinker_checkpoint(
        path,
        omni_classes(),
        needs,
        AUDIO_SPECIALS,
        shape,
        layers,
        token_ids,
        position_id_per_seconds=13,
    )
    fe = transformers.WhisperFeatureExtractor(feature_size=shape["audio"]["num_mel_bins"])
    fe.save_pretrained(path)
    return cfg, tok, fe


def hf_experts(name: str) -> str:
    """`name` where this transformers can select it for MoE experts, else "eager"."""
    if name == "eager":
        return name
    try:
        from transformers.integrations import moe as hf_moe

        table = getattr(getattr(hf_moe, "ExpertsInterface", None), "_global_mapping", {})
    except ImportError:  # a transformers without selectable experts implementations
        table = {}
    return name if name in table else "eager"


def clip(seconds: float, seed: int) -> np.ndarray:
    """A new clip per seed: the same one twice would be an encoder-cache hit."""
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * np.sin(2 * np.pi * 440 * t * (1 + t)) + 0.05 * noise).astype(np.float32)


def jaxmm_times(llm, encode, audio: np.ndarray, sp) -> dict:
    """One request's e2e time, then the audio tower alone (`encode`, the model's jitted
    audio encoder) on its prepared features."""
    from jaxmm.multimodal.inputs import prepare_multimodal_prompt

    prompt = {"prompt": PROMPT, "multi_modal_data": {"audio": (audio, SR)}}
    t0 = time.perf_counter()
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    e2e = time.perf_counter() - t0
    engine = llm.llm_engine
    _, _, mm = prepare_multimodal_prompt(engine, prompt)
    runner = engine.runner
    t0 = time.perf_counter()
    tc.sync_rows(encode(runner.params, "audio", [mm.items[0].data]))
    encoder = time.perf_counter() - t0
    n = mm.items[0].end - mm.items[0].start
    return dict(e2e_s=e2e, encoder_s=encoder, tokens=len(out.prompt_token_ids), audio=n)


def hf_times(model, tok, fe, audio: np.ndarray, device) -> dict:
    import torch

    from jaxmm.models.qwen3_omni_moe import audio_num_tokens

    t0 = time.perf_counter()
    feats = fe(
        audio,
        sampling_rate=SR,
        padding="longest",
        truncation=False,
        return_attention_mask=True,
        return_tensors="pt",
    )
    n = audio_num_tokens(int(feats["attention_mask"].sum()), model.config.audio_config.n_window)
    ids = tok(PROMPT.replace("<|audio_pad|>", "<|audio_pad|>" * n), return_tensors="pt")
    inputs = dict(
        input_ids=ids["input_ids"].to(device),
        attention_mask=ids["attention_mask"].to(device),
        input_features=feats["input_features"].to(device, torch.bfloat16),
        feature_attention_mask=feats["attention_mask"].to(device),
    )
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)
        tc.cuda_sync(device)
        e2e = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])
        tc.cuda_sync(device)
    return dict(hf_e2e_s=e2e, hf_encoder_s=time.perf_counter() - t0)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="omni-30b-a3b", choices=sorted(CONFIGS))
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (the tower is whole)")
    ap.add_argument("--seconds", type=float, nargs="+", default=[5.0, 30.0])
    tc.add_common_args(ap, attention_backend=False)
    ap.add_argument("--hf-experts", default="grouped_mm", help="eager, batched_mm, grouped_mm")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    tc.add_workdir_arg(ap)
    args = ap.parse_args(argv)

    path = os.path.join(args.workdir, f"qwen3-omni-{args.config}-{args.layers}l")
    cfg, tok, fe = write_checkpoint(args.config, args.layers, path)
    llm = tc.dummy_llm(path, 4096, args.max_num_batched_tokens)
    sp = tc.first_token()
    model = device = None
    if not args.no_hf:
        device = tc.torch_device(args.device)
        experts = hf_experts(args.hf_experts)
        for c in (cfg, cfg.text_config):
            c._experts_implementation = experts
        model = tc.build_hf(omni_classes()[1], cfg, device)
    runner = llm.llm_engine.runner
    encode = runner.model_obj.audio_encoder(runner.graphdef)  # one jit: compiled once a shape
    med = tc.median

    def rounds(seconds: float):
        """Clip i in round i, the same for both sides; round 0, untimed, compiles and plans."""

        def theirs(i):
            return hf_times(model, tok, fe, clip(seconds, i), device)

        return tc.time_rounds(
            args.iters,
            lambda i: jaxmm_times(llm, encode, clip(seconds, i), sp),
            None if model is None else theirs,
        )[1]

    results = []
    for seconds in args.seconds:
        ours, hf = rounds(seconds)
        r = {
            "benchmark": "qwen3_omni_audio_ttft",
            "config": args.config,
            "decoder_layers": args.layers,
            "architecture": "Qwen3OmniMoeThinkerForConditionalGeneration",
            "audio_seconds": seconds,
            "num_audio_tokens": ours[0]["audio"],
            "num_prompt_tokens": ours[0]["tokens"],
            "iters": args.iters,
            "warm": True,  # one untimed pass per length first: compile / start-up excluded
            "e2e_s": med([x["e2e_s"] for x in ours]),
            "encoder_s": med([x["encoder_s"] for x in ours]),
        }
        if hf:
            r["hf_e2e_s"] = med([x["hf_e2e_s"] for x in hf])
            r["hf_encoder_s"] = med([x["hf_encoder_s"] for x in hf])
            r["speedup_vs_hf"] = round(r["hf_e2e_s"] / r["e2e_s"], 3)
            r["encoder_speedup_vs_hf"] = round(r["hf_encoder_s"] / r["encoder_s"], 3)
            r["hf_device"] = str(device)
            r["hf_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
            r["hf_experts_implementation"] = getattr(
                model.config.text_config, "_experts_implementation", None
            )
        r.update(tc.env_fields())
        print(json.dumps(r), flush=True)
        results.append(r)
    return results


if __name__ == "__main__":
    main()
