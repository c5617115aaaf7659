"""Time to first token, one image: jaxmm vs transformers on a random-weight Qwen2-VL (no download).

    python benchmarks/vlm_ttft.py --config qwen2-vl-2b --sizes 448 1344      # GPU
    python benchmarks/vlm_ttft.py --config small --sizes 56 112 --iters 2    # CPU smoke

Writes config.json (Qwen2VLForConditionalGeneration, Qwen2-VL-2B shape by default),
preprocessor_config.json (Qwen2VLImageProcessor, the real checkpoint's pixel budget, which
admits 1344x1344) and a small BPE tokenizer with Qwen's special tokens (ids far below the
vocab; the config's image/vision token ids are set to match). Weights are random: jaxmm's
`load_format="dummy"` in bf16 on device, and `Qwen2VLForConditionalGeneration(config)` in
bf16 on the same device for transformers.

One prompt: a system turn, a user turn with one image (a fresh random image for every
timed run, so the encoder cache never serves it) and a question; prefix caching is off.
Every size runs once on both sides before it is timed, so compilation (XLA) and CUDA/cuBLAS
start-up are excluded; each number is the median of --iters runs.

jaxmm, split (each piece timed on its own, synchronised):
  preprocess_s  the HF image processor (MultimodalProcessor.image, as the front end calls it:
                for HF's PIL processor, fast_image.py's uint8 patches and byte table)
  encoder_s     the jitted vision tower on those pixels (MultimodalFrontend.encode), the
                transfer and the on-device byte -> float32 lookup included
  prefill_s     engine.step() from a prepared request until its first token is sampled
  e2e_s         wall time of llm.generate(prompt, max_tokens=1): all of the above plus image
                hashing, tokenisation, placeholder expansion and M-RoPE positions
transformers:
  hf_processor_s  image processor + placeholder expansion + tokenizer + host->device copy
  hf_model_s      model.generate(max_new_tokens=1), synchronised
  hf_e2e_s        their sum
speedup_vs_hf = hf_e2e_s / e2e_s. One JSON line per size.
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

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "You are a helpful assistant.",
    "Describe this image in detail. What objects are in the picture, and what colours?",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "system user assistant image video picture photo scene",
] * 10
PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
    "Describe this image in detail.<|im_end|>\n<|im_start|>assistant\n"
)

# Qwen2-VL-2B-Instruct's shapes
CONFIGS = {
    "qwen2-vl-2b": dict(
        text=dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
            tie_word_embeddings=True,
        ),
        vision=dict(
            depth=32,
            embed_dim=1280,
            num_heads=16,
            hidden_size=1536,
            mlp_ratio=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
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
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            tie_word_embeddings=True,
        ),
        vision=dict(
            depth=2,
            embed_dim=32,
            num_heads=4,
            hidden_size=64,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
    ),
}
PREPROCESSOR = {  # Qwen2-VL-2B-Instruct's preprocessor_config.json
    "image_processor_type": "Qwen2VLImageProcessor",
    "min_pixels": 3136,
    "max_pixels": 12845056,  # 3584^2: 1344^2 is kept as is
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def make_tokenizer(path: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(path)
    return fast


def write_checkpoint(name: str, path: str):
    """config.json + preprocessor_config.json + tokenizer; returns the transformers config."""
    import transformers

    os.makedirs(path, exist_ok=True)
    tok = make_tokenizer(path)
    shape = CONFIGS[name]
    if len(tok) > shape["text"]["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the vocab")
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(
            shape["text"],
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=shape["vision"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=shape["text"]["tie_word_embeddings"],
    )
    cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR, f, indent=1)
    return cfg, tok


class Images:
    """A fresh blocky random RGB image per call: never in the encoder or prefix cache."""

    def __init__(self, seed: int = 0):
        self.rs = np.random.RandomState(seed)

    def __call__(self, width: int, height: int | None = None):
        """A `width` x `height` image (square without `height`)."""
        from PIL import Image

        height = width if height is None else height
        base = self.rs.randint(0, 255, (height // 8 + 1, width // 8 + 1, 3), np.uint8)
        return Image.fromarray(base).resize((width, height), Image.NEAREST)


_median = tc.median  # the other benchmarks' name for it


# ---------------------------------------------------------------------------------------
# jaxmm


_sync = tc.sync_rows


def jaxmm_run(llm, img, sp, prompt: str = PROMPT, describe=None) -> dict:
    """One image: the pieces timed apart (the end-to-end call is `jaxmm_e2e`). Shared by the
    other TTFT benchmarks: `prompt` holds the model's image placeholder; `describe(processed)`
    adds fields about the processed image to the result."""
    from jaxmm.multimodal.inputs import prepare_multimodal_prompt

    engine = llm.llm_engine
    runner = engine.runner
    fe = engine.mm_frontend()
    if runner._mm_encode is None:
        runner._mm_encode = runner.model_obj.mm_encoder(runner.graphdef)
    # 1. the HF image processor, as the front end calls it
    t0 = time.perf_counter()
    processed = fe.processor.image(img, {})
    t1 = time.perf_counter()
    # 2. the vision tower (its rows stay on the device: wait for them)
    feats = runner._mm_encode(runner.params, "image", [processed])
    _sync(feats)
    t2 = time.perf_counter()
    assert feats[0].shape[0] == fe.model.mm_num_tokens("image", processed)
    # 3. prefill to the first token, from a prepared request (its prep is not timed)
    request = {"prompt": prompt, "multi_modal_data": {"image": img}}
    text, ids, mm = prepare_multimodal_prompt(engine, request)
    out = {
        "preprocess_s": t1 - t0,
        "encoder_s": t2 - t1,
        "prefill_s": tc.prefill_s(engine, text, ids, mm, sp),
        "num_prompt_tokens": len(ids),
        "num_image_tokens": int(feats[0].shape[0]),
    }
    if processed.get("grid_thw") is not None:  # Qwen-VL towers: the patch grid
        out["grid_thw"] = [int(x) for x in processed["grid_thw"]]
    if describe is not None:
        out.update(describe(processed))
    return out


def jaxmm_e2e(llm, img, sp, prompt: str = PROMPT) -> float:
    return tc.generate_one_s(llm, {"prompt": prompt, "multi_modal_data": {"image": img}}, sp)


# ---------------------------------------------------------------------------------------
# transformers


def hf_inputs(path: str, tok, img, device):
    """HF inputs the way Qwen2VLProcessor builds them (it needs torchvision for its video
    processor, so the image processor + placeholder expansion are done here)."""
    import torch
    from transformers import AutoImageProcessor

    ip = hf_inputs.cache.get(path)
    if ip is None:
        ip = hf_inputs.cache[path] = AutoImageProcessor.from_pretrained(path)
    out = ip(images=[img], return_tensors="pt")
    grid = out["image_grid_thw"]
    n = int(grid[0].prod()) // ip.merge_size**2
    text = PROMPT.replace("<|image_pad|>", "<|image_pad|>" * n)
    ids = tok(text, return_tensors="pt").input_ids
    types = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).long()
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "mm_token_type_ids": types.to(device),
        "pixel_values": out["pixel_values"].to(device),
        "image_grid_thw": grid.to(device),
    }


hf_inputs.cache = {}


def hf_run(model, path, tok, img, device) -> dict:
    return tc.hf_generate_timed(model, device, lambda: hf_inputs(path, tok, img, device))


def build_hf(cfg, device):
    import transformers

    return tc.build_hf(transformers.Qwen2VLForConditionalGeneration, cfg, device)


def size_rounds(iters: int, llm, sp, fresh, model, path: str, tok, device):
    """One size's rounds (`ttft_common.time_rounds`): jaxmm's pieces, its end-to-end call and
    transformers' (with `model`), each on a fresh image `fresh()`; the first round, untimed,
    compiles and plans. Shared by qwen3_vl_ttft.py."""

    def theirs(i):
        return hf_run(model, path, tok, fresh(), device)

    return tc.time_rounds(
        iters,
        lambda i: jaxmm_run(llm, fresh(), sp),
        lambda i: jaxmm_e2e(llm, fresh(), sp),
        None if model is None else theirs,
    )


# ---------------------------------------------------------------------------------------


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="qwen2-vl-2b", choices=sorted(CONFIGS))
    ap.add_argument("--sizes", type=int, nargs="+", default=[448, 1344])
    tc.add_common_args(ap, max_num_batched_tokens=4096)
    ap.add_argument("--profile", action="store_true", help="add a per-kernel device profile")
    tc.add_workdir_arg(ap)
    args = ap.parse_args(argv)

    path = os.path.join(args.workdir, f"vlm-{args.config}")
    cfg, tok = write_checkpoint(args.config, path)
    # the longest prompt: the largest image's tokens plus the text
    patch, merge = PREPROCESSOR["patch_size"], PREPROCESSOR["merge_size"]
    longest = max((s // patch) ** 2 // merge**2 for s in args.sizes) + 64
    max_len = max(1024, -(-longest // 1024) * 1024)
    llm = tc.dummy_llm(
        path,
        max_len,
        max(args.max_num_batched_tokens, 64),
        attention_backend=args.attention_backend,
    )
    runner = llm.llm_engine.runner
    sp = tc.first_token()

    model = device = None
    if not args.no_hf:
        device = tc.torch_device(args.device)
        model = build_hf(cfg, device)

    images = Images(0)
    results = []
    for size in args.sizes:
        fresh = functools.partial(images, size)
        _, (runs, e2e, hf) = size_rounds(args.iters, llm, sp, fresh, model, path, tok, device)
        r = {
            "benchmark": "vlm_ttft",
            "config": args.config,
            "image_size": [size, size],
            "grid_thw": runs[0]["grid_thw"],
            "num_image_tokens": runs[0]["num_image_tokens"],
            "num_prompt_tokens": runs[0]["num_prompt_tokens"],
            "iters": args.iters,
            "warm": True,  # one untimed pass per size first: compile / start-up excluded
            "prefix_caching": False,
            **tc.ttft_fields(runs, e2e),
        }
        if hf:
            r.update(tc.hf_fields(hf, r["e2e_s"], device, model))
        ip = llm.llm_engine.mm_frontend().processor.image_processor
        r.update(tc.env_fields(runner, image_processor=type(ip).__name__, jaxmm_version=True))
        if args.profile:  # device kernels of whole llm.generate calls (encoder + prefill)
            from benchmarks.profile_step import profile

            def call(size=size):
                return jaxmm_e2e(llm, images(size), sp)

            r["profile"] = profile(call, 3, args.workdir, with_gaps=True)
        print(json.dumps(r), flush=True)
        results.append(r)
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
