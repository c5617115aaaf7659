"""Phi-4-multimodal (random bf16): TTFT for one image or one audio clip vs transformers.

    python benchmarks/phi4mm_ttft.py                          # GPU: Phi-4-multimodal shape
    python benchmarks/phi4mm_ttft.py --config small --iters 1 --device cpu --seconds 2 --size 96

The checkpoint has microsoft/Phi-4-multimodal-instruct's shapes (a 32-layer Phi-4-mini decoder
of width 3072 with partial rotary and LongRoPE; a 27-layer SigLIP tower of width 1152 over
448² crops of 14² patches; a 24-block conformer of width 1024 over 80 mel bins, 8x
subsampled), a small BPE tokenizer with `<|image|>` / `<|audio|>`, the feature extractor
and the image processor's config. Weights are random: jaxmm's `load_format="dummy"` in bf16,
`Phi4MultimodalForCausalLM(config)` in bf16 on the same device for transformers.

One JSON line per modality ("phi4mm_ttft"): one prompt with one item (a fresh random one per
timed run: no cache serves it), prefix caching off; every piece runs once before it is timed;
medians of --iters runs.
  jaxmm: preprocess_s (the HD crops, or the log-mel, as the front end makes them), encoder_s
  (the jitted tower + projection), e2e_s (wall time of llm.generate(max_tokens=1): all of it
  plus hashing, tokenising, placeholder expansion and the prefill).
  transformers: hf_processor_s (its feature extractor for audio; for images jaxmm's crops,
  as its image processor needs torchvision: "hf_pixels" says which), hf_model_s (generate
  of one token, synchronised), hf_e2e_s. speedup_vs_hf = hf_e2e_s / e2e_s.
A transformers without Phi-4-multimodal (before 4.50) is reported in the JSON ("error").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import ttft_common as tc  # noqa: E402  (sets the JAX memory fraction first)
from benchmarks import vlm_ttft  # noqa: E402

SR = 16000
PROMPTS = {
    "image": "<|im_start|>user\n<|image|>Describe the image.<|im_end|>\n<|im_start|>assistant\n",
    "audio": "<|im_start|>user\n<|audio|>Transcribe this audio.<|im_end|>\n<|im_start|>assistant\n",
}
CONFIGS = {
    "phi-4-multimodal": dict(
        text=dict(
            vocab_size=200064,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=24,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            original_max_position_embeddings=4096,
            rotary=48,  # 128 * 0.75 / 2 factors
        ),
        vision={},  # Phi4MultimodalVisionConfig's defaults: the released tower
        audio={},  # Phi4MultimodalAudioConfig's defaults
        image_size=448,
        patch_size=14,
    ),
    "small": dict(  # seconds on a CPU: for the smoke test (16 x 16 pooled features a crop)
        text=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16384,
            original_max_position_embeddings=4096,
            rotary=6,
        ),
        vision=dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
        ),
        audio=dict(
            hidden_size=32,
            intermediate_size=48,
            num_blocks=2,
            num_attention_heads=4,
            ext_pw_out_channel=32,
            depthwise_separable_out_channel=32,
            nemo_conv_channels=16,
        ),
        image_size=64,
        patch_size=2,
    ),
}


def write_checkpoint(name: str, path: str):
    """config.json, the tokenizer, the feature extractor and the image processor's config;
    returns the transformers config."""
    import transformers

    os.makedirs(path, exist_ok=True)
    tok = vlm_ttft.make_tokenizer(path)
    tok.add_special_tokens({"additional_special_tokens": ["<|image|>", "<|audio|>"]})
    tok.save_pretrained(path)
    shape = CONFIGS[name]
    text = dict(shape["text"])
    R = text.pop("rotary")
    S, p = shape["image_size"], shape["patch_size"]
    cfg = transformers.Phi4MultimodalConfig(
        **text,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "short_factor": [1.0] * R,
            "long_factor": [4.0] * R,
            "original_max_position_embeddings": text["original_max_position_embeddings"],
        },
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        vision_config=dict(
            shape["vision"],
            image_size=S,
            patch_size=p,
            crop_size=S,
            image_token_id=tok.convert_tokens_to_ids("<|image|>"),
        ),
        audio_config=dict(shape["audio"], audio_token_id=tok.convert_tokens_to_ids("<|audio|>")),
    )
    cfg.architectures = ["Phi4MultimodalForCausalLM"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(path)
    transformers.Phi4MultimodalFeatureExtractor().save_pretrained(path)
    image_processor = {
        "image_processor_type": "Phi4MultimodalImageProcessor",
        "size": {"height": S, "width": S},
        "patch_size": p,
        "dynamic_hd": 36,
    }
    with open(os.path.join(path, "processor_config.json"), "w") as f:
        json.dump({"image_processor": image_processor}, f, indent=1)
    return cfg, tok


def make_item(modality: str, rng, size: int, seconds: float):
    """A fresh random image (size x 3/4 size: several crops) or clip."""
    from PIL import Image

    if modality == "image":
        h = size * 3 // 4
        base = rng.integers(0, 255, (h // 8 + 1, size // 8 + 1, 3), dtype=np.uint8)
        return Image.fromarray(base).resize((size, h), Image.NEAREST)
    t = np.arange(int(seconds * SR)) / SR
    sweep = 0.3 * np.sin(2 * np.pi * (200 + 300 * rng.random()) * t * (1 + t / seconds))
    return (sweep + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def mm_data(modality: str, item) -> dict:
    return {modality: (item, SR) if modality == "audio" else item}


# ---------------------------------------------------------------------------------------
# jaxmm


def jaxmm_pieces(llm, modality: str, item) -> dict:
    """The front end's preprocessing and the encoder, timed apart."""
    from jaxmm.multimodal.processor import processor_configs

    engine = llm.llm_engine
    runner = engine.runner
    model = runner.model_obj
    if runner._mm_encode is None:
        runner._mm_encode = model.mm_encoder(runner.graphdef)
    t0 = time.perf_counter()
    if modality == "image":
        config = processor_configs(engine.mm_frontend().processor_path).get("image_processor")
        data = model.mm_process_image(item, config, {})
    else:
        fe = engine.audio_frontend()
        data = model.mm_audio_features(fe.feature_extractor, fe.load((item, SR)), SR, {})
    t1 = time.perf_counter()
    rows = runner._mm_encode(runner.params, modality, [data])
    tc.sync_rows(rows)
    t2 = time.perf_counter()
    return {"preprocess_s": t1 - t0, "encoder_s": t2 - t1, "num_mm_tokens": int(rows[0].shape[0])}


def jaxmm_e2e(llm, modality: str, item, sp) -> tuple[float, int]:
    request = {"prompt": PROMPTS[modality], "multi_modal_data": mm_data(modality, item)}
    t0 = time.perf_counter()
    outs = llm.generate([request], sp, use_tqdm=False)
    t1 = time.perf_counter()
    assert len(outs[0].outputs[0].token_ids) == 1
    return t1 - t0, len(outs[0].prompt_token_ids)


# ---------------------------------------------------------------------------------------
# transformers


def hf_run(model, path: str, tok, modality: str, item, device) -> dict:
    import torch
    from transformers import AutoFeatureExtractor

    from jaxmm.models.encoders import phi4mm_image
    from jaxmm.multimodal.processor import processor_configs

    def make_inputs() -> dict:
        token = tok.convert_tokens_to_ids(f"<|{modality}|>")
        if modality == "image":
            config = phi4mm_image.settings(processor_configs(path).get("image_processor"))
            out = phi4mm_image.preprocess(item, config)
            n = out["num_img_tokens"]
            inputs = {
                "image_pixel_values": torch.from_numpy(out["image_pixel_values"][None]),
                "image_sizes": torch.tensor([out["image_size"]]),
                "image_attention_mask": torch.from_numpy(out["image_attention_mask"][None]),
            }
        else:
            fe = AutoFeatureExtractor.from_pretrained(path)
            inputs = dict(fe([item], sampling_rate=SR, return_tensors="pt"))
            n = int(inputs["audio_embed_sizes"][0])
        ids = []
        for t in tok(PROMPTS[modality]).input_ids:
            ids.extend([t] * n if t == token else [t])
        inputs = {k: v.to(device) for k, v in inputs.items()}
        for k in ("image_pixel_values", "audio_input_features"):
            if k in inputs:
                inputs[k] = inputs[k].to(torch.bfloat16)
        return {"input_ids": torch.tensor([ids], device=device), **inputs}

    return tc.hf_generate_timed(model, device, make_inputs)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="phi-4-multimodal", choices=sorted(CONFIGS))
    ap.add_argument("--modality", nargs="+", default=["image", "audio"], choices=["image", "audio"])
    ap.add_argument("--size", type=int, default=896, help="image width (height 3/4 of it)")
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length")
    tc.add_common_args(ap)
    tc.add_workdir_arg(ap)
    args = ap.parse_args(argv)

    import transformers

    if not hasattr(transformers, "Phi4MultimodalConfig"):
        error = f"transformers {transformers.__version__} has no Phi4MultimodalConfig"
        return tc.error_line("phi4mm_ttft", args.config, error)
    path = os.path.join(args.workdir, f"phi4mm-{args.config}")
    cfg, tok = write_checkpoint(args.config, path)
    llm = tc.dummy_llm(path, 4096, 2048, attention_backend=args.attention_backend)
    runner = llm.llm_engine.runner
    sp = tc.first_token()

    model = device = hf_error = None
    if not args.no_hf:
        device = tc.torch_device(args.device)
        model, hf_error = tc.try_hf(
            lambda: tc.build_hf(transformers.Phi4MultimodalForCausalLM, cfg, device)
        )

    rng = np.random.default_rng(0)

    def rounds(modality: str):
        """A fresh item for every run; the warm round compiles."""

        def fresh():
            return make_item(modality, rng, args.size, args.seconds)

        def theirs(i):
            return hf_run(model, path, tok, modality, fresh(), device)

        return tc.time_rounds(
            args.iters,
            lambda i: jaxmm_pieces(llm, modality, fresh()),
            lambda i: jaxmm_e2e(llm, modality, fresh(), sp),
            None if model is None else theirs,
        )

    results = []
    for modality in args.modality:
        (warm, (_, num_prompt), _), (pieces, e2e, hf) = rounds(modality)
        r = {
            "benchmark": "phi4mm_ttft",
            "config": args.config,
            "modality": modality,
            "image_size": [args.size, args.size * 3 // 4] if modality == "image" else None,
            "audio_seconds": args.seconds if modality == "audio" else None,
            "num_mm_tokens": warm["num_mm_tokens"],
            "num_prompt_tokens": num_prompt,
            "iters": args.iters,
            "prefix_caching": False,
            **tc.medians(pieces, ("preprocess_s", "encoder_s")),
            "e2e_s": tc.median([t for t, _ in e2e]),
        }
        if hf:
            r.update(tc.hf_fields(hf, r["e2e_s"], device))
            r["hf_pixels"] = "jaxmm" if modality == "image" else None
        if hf_error:
            r["hf_error"] = hf_error
        r.update(tc.env_fields(runner, batched_tokens=False, python=False))
        print(json.dumps(r), flush=True)
        results.append(r)
    return results


if __name__ == "__main__":
    main()
