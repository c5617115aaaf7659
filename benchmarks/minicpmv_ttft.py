"""Time to first token, one image: jaxmm vs transformers on a random-weight MiniCPM-V 4.6.

    python benchmarks/minicpmv_ttft.py --config medium --sizes 448x448 1344x896 1920x1080
    python benchmarks/minicpmv_ttft.py --config small --sizes 120x50 --iters 1 --device cpu

Writes config.json (MiniCPMV4_6ForConditionalGeneration), the MiniCPM-V 4.6 PIL image
processor's config and a small BPE tokenizer with MiniCPM-V's named tokens. The "medium"
shapes are assumed, not read from a released checkpoint (no hub here): a SigLIP-so400m
tower (1152 wide, 27 layers, patch 14, 980 px position table, window merger after layer
6) sliced at the processor's defaults (448 px views, up to 9 slices), and a Qwen3.5
hybrid text model of about 2B parameters (3 linear-attention layers per full one).
Weights are random: jaxmm's `load_format="dummy"` in bf16, and
`MiniCPMV4_6ForConditionalGeneration(config)` in bf16 on the same device for
transformers.

One prompt: a user turn with one image (a fresh random image per timed run, so no cache
serves it; larger than 448^2 it is sliced: 1344x896 is a 2x3 grid + the source view) and
a question; prefix caching is off. Every size runs once on both sides before it is timed;
each number is the median of --iters runs. The fields are `onevision_ttft.py`'s
(`vlm_ttft.jaxmm_run` times jaxmm's pieces): preprocess_s, encoder_s (the tower and merger
per sub-image size, then the span's rows), prefill_s, e2e_s; hf_processor_s (the HF
processor: slicing, placeholders, tokenizer), hf_model_s (generate, max_new_tokens=1),
hf_e2e_s, speedup_vs_hf = hf_e2e_s / e2e_s; num_sub_images. One JSON line per size.

A transformers without MiniCPM-V 4.6 (before 5.2x) cannot build the checkpoint or process
its images, for either side: one JSON line with "error" says so.
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
from benchmarks.onevision_ttft import Images, parse_size  # noqa: E402

PROMPT = (
    "<|im_start|>user\n<|image_pad|>\nDescribe this image in detail.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
NAMED_TOKENS = dict(
    image_token="<|image_pad|>",
    video_token="<|video_pad|>",
    image_start_token="<image>",
    image_end_token="</image>",
    slice_start_token="<slice>",
    slice_end_token="</slice>",
    image_id_start_token="<image_id>",
    image_id_end_token="</image_id>",
)
CONFIGS = {
    "medium": dict(  # assumed shapes: SigLIP-so400m + a ~2B Qwen3.5 hybrid
        text=dict(
            vocab_size=152000,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=24,
            layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 6,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=256,
            linear_num_key_heads=16,
            linear_num_value_heads=16,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
        ),
        vision=dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=980,
            patch_size=14,
        ),
        insert_layer_id=6,
        processor=dict(scale_resolution=448, patch_size=14, max_slice_nums=9),
    ),
    "small": dict(  # seconds on a CPU: for the smoke test
        text=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=8,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        ),
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            patch_size=7,
        ),
        insert_layer_id=0,
        processor=dict(scale_resolution=56, patch_size=7, max_slice_nums=4),
    ),
}


def missing_reference() -> str | None:
    """Why this transformers cannot run the benchmark, or None."""
    import transformers

    if not hasattr(transformers, "MiniCPMV4_6ForConditionalGeneration"):
        return (
            f"transformers {transformers.__version__} has no MiniCPMV4_6ForConditionalGeneration "
            "(MiniCPM-V 4.6's config, image processor and model): neither side can run"
        )
    return None


def image_processor(name: str):
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import (
        MiniCPMV4_6ImageProcessorPil,
    )

    return MiniCPMV4_6ImageProcessorPil(**CONFIGS[name]["processor"])


def write_checkpoint(name: str, path: str):
    """config.json + the image processor's config + tokenizer; returns (config, tokenizer)."""
    import transformers

    os.makedirs(path, exist_ok=True)
    tok = vlm_ttft.make_tokenizer(path)
    tok.add_special_tokens({"additional_special_tokens": list(NAMED_TOKENS.values())})
    tok.save_pretrained(path)
    # reloaded with the names, which the processor reads (tok.image_token, ...)
    tok = transformers.AutoTokenizer.from_pretrained(path, extra_special_tokens=NAMED_TOKENS)
    tok.save_pretrained(path)
    shape = CONFIGS[name]
    if len(tok) > shape["text"]["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the vocab")
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    text = transformers.Qwen3_5TextConfig(
        **shape["text"], bos_token_id=pad, eos_token_id=eos, pad_token_id=pad
    )
    cfg = transformers.MiniCPMV4_6Config(
        text_config=text.to_dict(),
        vision_config=shape["vision"],
        insert_layer_id=shape["insert_layer_id"],
        image_token_id=tok.image_token_id,
        video_token_id=tok.video_token_id,
        tie_word_embeddings=shape["text"]["tie_word_embeddings"],
    )
    cfg.architectures = ["MiniCPMV4_6ForConditionalGeneration"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(path)
    image_processor(name).save_pretrained(path)
    return cfg, tok


def hf_processor(name: str, tok):
    import transformers
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import (
        MiniCPMV4_6VideoProcessor,
    )

    from tests.helpers import make_processor

    return make_processor(
        transformers.MiniCPMV4_6Processor,
        image_processor=image_processor(name),
        video_processor=MiniCPMV4_6VideoProcessor(**CONFIGS[name]["processor"]),
        tokenizer=tok,
    )


def hf_run(model, proc, img, device) -> dict:
    import torch

    def make_inputs() -> dict:
        out = proc(text=[PROMPT], images=[[img]], return_tensors="pt")
        return {
            "input_ids": out["input_ids"].to(device),
            "attention_mask": out["attention_mask"].to(device),
            "pixel_values": out["pixel_values"].to(device, torch.bfloat16),
            "target_sizes": out["target_sizes"].to(device),
        }

    return tc.hf_generate_timed(model, device, make_inputs)


def build_hf(cfg, device):
    import transformers

    return tc.build_hf(transformers.MiniCPMV4_6ForConditionalGeneration, cfg, device)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="medium", choices=sorted(CONFIGS))
    ap.add_argument("--sizes", nargs="+", default=["448x448", "1344x896", "1920x1080"])
    tc.add_common_args(ap, max_num_batched_tokens=8192)
    tc.add_workdir_arg(ap)
    args = ap.parse_args(argv)

    why = missing_reference()
    if why is not None:
        return tc.error_line("minicpmv_ttft", args.config, why)

    path = os.path.join(args.workdir, f"minicpmv-{args.config}")
    cfg, tok = write_checkpoint(args.config, path)
    llm = tc.dummy_llm(
        path, 8192, max(args.max_num_batched_tokens, 64), attention_backend=args.attention_backend
    )
    runner = llm.llm_engine.runner
    sp = tc.first_token()

    def sub_images(processed) -> dict:
        return {"num_sub_images": len(processed["target_sizes"])}

    model = device = proc = None
    if not args.no_hf:
        device = tc.torch_device(args.device)
        model = build_hf(cfg, device)
        proc = hf_processor(args.config, tok)

    images = Images(0)
    results = []
    for size in args.sizes:
        w, h = parse_size(size)

        def fresh(w=w, h=h):
            return images(w, h)

        _, (runs, e2e, hf) = tc.time_rounds(  # the warm round compiles: untimed
            args.iters,
            lambda i: vlm_ttft.jaxmm_run(llm, fresh(), sp, PROMPT, describe=sub_images),
            lambda i: vlm_ttft.jaxmm_e2e(llm, fresh(), sp, PROMPT),
            None if model is None else lambda i: hf_run(model, proc, fresh(), device),
        )
        r = {
            "benchmark": "minicpmv_ttft",
            "config": args.config,
            "image_size": [w, h],
            "num_sub_images": runs[0]["num_sub_images"],
            "num_image_tokens": runs[0]["num_image_tokens"],
            "num_prompt_tokens": runs[0]["num_prompt_tokens"],
            "iters": args.iters,
            "warm": True,
            "prefix_caching": False,
            **tc.ttft_fields(runs, e2e),
        }
        if hf:
            r["hf_prompt_tokens"] = hf[0]["hf_prompt_tokens"]
            r.update(tc.hf_fields(hf, r["e2e_s"], device, model))
        r.update(tc.env_fields(runner, jaxmm_version=True))
        print(json.dumps(r), flush=True)
        results.append(r)
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
