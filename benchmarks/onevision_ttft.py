"""Time to first token, one image: jaxmm vs transformers on a random-weight LLaVA-OneVision.

    python benchmarks/onevision_ttft.py --config onevision-0.5b --sizes 384x384 896x896 1280x720
    python benchmarks/onevision_ttft.py --config small --sizes 56x56 70x40 --iters 1 --device cpu

Writes config.json (LlavaOnevisionForConditionalGeneration, llava-onevision-qwen2-0.5b-ov's
shapes by default: SigLIP-so400m at 384 px with 26 layers, Qwen2-0.5B, the default 36
`image_grid_pinpoints`, `anyres_max_9`), the image processor's config and a small BPE
tokenizer with `<image>` / `<video>`. Weights are random: jaxmm's `load_format="dummy"` in
bf16, and `LlavaOnevisionForConditionalGeneration(config)` in bf16 on the same device for
transformers.

One prompt: a user turn with one image (a fresh random image per timed run, so no cache
serves it; alone in its prompt, so it is tiled: an 896x896 image is 3x3 tiles + the base,
7371 image tokens) and a question; prefix caching is off. Every size runs once on both
sides before it is timed (compilation, CUDA start-up excluded); each number is the median
of --iters runs.

jaxmm, each piece timed on its own, synchronised:
  preprocess_s  the front end's pixels (MultimodalProcessor.image: for HF's PIL processor,
                anyres.py's Pillow resize and tiles as bytes, bitwise HF's values)
  encoder_s     the jitted SigLIP tower + projector on every tile (the bytes' values looked
                up on the device), then the packing (stitch, crop, anyres_max, newlines)
  prefill_s     engine.step() from a prepared request until its first token is sampled
  e2e_s         wall time of llm.generate(prompt, max_tokens=1): all of the above plus
                hashing, tokenisation and placeholder expansion
transformers:
  hf_processor_s  image processor + placeholder expansion (the count jaxmm computes, equal
                  to `LlavaOnevisionProcessor`'s in the parity tests) + tokenizer + copy
  hf_model_s      model.generate(max_new_tokens=1), synchronised
  hf_e2e_s        their sum
speedup_vs_hf = hf_e2e_s / e2e_s. One JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from benchmarks import ttft_common as tc  # noqa: E402  (sets the JAX memory fraction first)
from benchmarks import vlm_ttft  # noqa: E402

PROMPT = (
    "<|im_start|>user\n<image>\nDescribe this image in detail.<|im_end|>\n<|im_start|>assistant\n"
)
CONFIGS = {
    "onevision-0.5b": dict(  # llava-hf/llava-onevision-qwen2-0.5b-ov-hf's shapes
        text=dict(
            vocab_size=152000,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
        vision=dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=26,
            num_attention_heads=16,
            image_size=384,
            patch_size=14,
            vision_use_head=False,
        ),
    ),
    "small": dict(  # seconds on a CPU: for the smoke test
        text=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=7,
            vision_use_head=False,
        ),
    ),
}


def pinpoints(tile: int) -> list[list[int]]:
    """transformers' default grid: 1..6 tiles down by 1..6 across, in its order."""
    return [[tile * i, tile * j] for i in range(1, 7) for j in range(1, 7)]


def image_processor_class():
    try:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil as cls,
        )
    except ImportError:  # transformers without the PIL backend class
        from transformers.models.llava_onevision.image_processing_llava_onevision import (
            LlavaOnevisionImageProcessor as cls,
        )
    return cls


def write_checkpoint(name: str, path: str):
    """config.json + the image processor's config + tokenizer; returns (config, tokenizer)."""
    import transformers

    os.makedirs(path, exist_ok=True)
    tok = vlm_ttft.make_tokenizer(path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tok.save_pretrained(path)
    shape = CONFIGS[name]
    if len(tok) > shape["text"]["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the vocab")
    tile = shape["vision"]["image_size"]
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = transformers.LlavaOnevisionConfig(
        text_config=transformers.Qwen2Config(
            **shape["text"], bos_token_id=pad, eos_token_id=eos, pad_token_id=pad
        ),
        vision_config=transformers.SiglipVisionConfig(**shape["vision"]),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=pinpoints(tile),
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=shape["text"]["tie_word_embeddings"],
    )
    cfg.architectures = ["LlavaOnevisionForConditionalGeneration"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(path)
    image_processor_class()(
        size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints(tile)
    ).save_pretrained(path)
    return cfg, tok


Images = vlm_ttft.Images  # images(width, height): minicpmv_ttft.py's name for it


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h or w)


# ---------------------------------------------------------------------------------------
# jaxmm


def jaxmm_run(llm, img, sp) -> dict:
    """One image: the pieces timed apart (`vlm_ttft.jaxmm_run`), and its tile count."""

    def tiles(processed) -> dict:
        return {"num_tiles": len(processed["pixel_values"])}

    return vlm_ttft.jaxmm_run(llm, img, sp, PROMPT, describe=tiles)


def jaxmm_e2e(llm, img, sp) -> float:
    return vlm_ttft.jaxmm_e2e(llm, img, sp, PROMPT)


# ---------------------------------------------------------------------------------------
# transformers


def hf_run(model, ip, tok, img, num_image_tokens: int, device) -> dict:
    import torch

    def make_inputs() -> dict:
        out = ip(images=[img], return_tensors="pt")
        ids = tok(PROMPT.replace("<image>", "<image>" * num_image_tokens), return_tensors="pt")
        return {
            "input_ids": ids.input_ids.to(device),
            "attention_mask": ids.attention_mask.to(device),
            "pixel_values": out["pixel_values"].to(device, torch.bfloat16),
            "image_sizes": out["image_sizes"].to(device),
            "batch_num_images": torch.tensor([1]),
        }

    return tc.hf_generate_timed(model, device, make_inputs)


def build_hf(cfg, device):
    import transformers

    return tc.build_hf(transformers.LlavaOnevisionForConditionalGeneration, cfg, device)


# ---------------------------------------------------------------------------------------


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="onevision-0.5b", choices=sorted(CONFIGS))
    ap.add_argument("--sizes", nargs="+", default=["384x384", "896x896", "1280x720"])
    tc.add_common_args(ap, max_num_batched_tokens=8192)
    tc.add_workdir_arg(ap)
    args = ap.parse_args(argv)

    path = os.path.join(args.workdir, f"onevision-{args.config}")
    cfg, tok = write_checkpoint(args.config, path)
    vc = cfg.vision_config
    side = vc.image_size // vc.patch_size
    # the most an image can take: anyres_max_9 lets the cropped map reach 1.1^2 * 9 tiles
    longest = side**2 + int(9 * 1.21 * side**2) + 4 * side + 64
    llm = tc.dummy_llm(
        path,
        max(1024, -(-longest // 1024) * 1024),
        max(args.max_num_batched_tokens, 64),
        attention_backend=args.attention_backend,
    )
    runner = llm.llm_engine.runner
    sp = tc.first_token()

    model = device = None
    if not args.no_hf:
        from transformers import AutoImageProcessor

        device = tc.torch_device(args.device)
        model = build_hf(cfg, device)
        ip = AutoImageProcessor.from_pretrained(path)

    images = Images(0)
    results = []
    for size in args.sizes:
        w, h = parse_size(size)
        counts = []  # the image's token count, from jaxmm's run (its placeholder for HF)

        def ours(i, w=w, h=h, counts=counts) -> dict:
            out = jaxmm_run(llm, images(w, h), sp)
            counts.append(out["num_image_tokens"])
            return out

        def theirs(i, w=w, h=h, counts=counts) -> dict:
            return hf_run(model, ip, tok, images(w, h), counts[0], device)

        (warm, _, _), (runs, e2e, hf) = tc.time_rounds(  # the warm round compiles: untimed
            args.iters,
            ours,
            lambda i, w=w, h=h: jaxmm_e2e(llm, images(w, h), sp),
            None if model is None else theirs,
        )
        n = warm["num_image_tokens"]
        r = {
            "benchmark": "onevision_ttft",
            "config": args.config,
            "image_size": [w, h],
            "num_tiles": runs[0]["num_tiles"],
            "num_image_tokens": n,
            "num_prompt_tokens": runs[0]["num_prompt_tokens"],
            "iters": args.iters,
            "warm": True,
            "prefix_caching": False,
            **tc.ttft_fields(runs, e2e),
        }
        if hf:
            r.update(tc.hf_fields(hf, r["e2e_s"], device, model))
        r.update(tc.env_fields(runner, jaxmm_version=True))
        print(json.dumps(r), flush=True)
        results.append(r)
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
