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
import platform
import sys
import tempfile
import time

# jaxmm and torch share one GPU here: keep JAX from preallocating most of it
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

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

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    out = proc(text=[PROMPT], images=[[img]], return_tensors="pt")
    inputs = {
        "input_ids": out["input_ids"].to(device),
        "attention_mask": out["attention_mask"].to(device),
        "pixel_values": out["pixel_values"].to(device, torch.bfloat16),
        "target_sizes": out["target_sizes"].to(device),
    }
    sync()
    t1 = time.perf_counter()
    with torch.inference_mode():
        gen = model.generate(
            **inputs, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    sync()
    t2 = time.perf_counter()
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 1
    return {"hf_processor_s": t1 - t0, "hf_model_s": t2 - t1, "hf_prompt_tokens": gen.shape[1] - 1}


def build_hf(cfg, device):
    import torch
    import transformers

    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.MiniCPMV4_6ForConditionalGeneration._from_config(
            cfg, dtype=torch.bfloat16
        )
    return model.eval()


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="medium", choices=sorted(CONFIGS))
    ap.add_argument("--sizes", nargs="+", default=["448x448", "1344x896", "1920x1080"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default=None, help="torch device for transformers (cuda / cpu)")
    ap.add_argument("--no-hf", action="store_true", help="time jaxmm only")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxmm-bench"))
    args = ap.parse_args(argv)

    import jax
    import torch
    import transformers

    import jaxmm

    why = missing_reference()
    if why is not None:
        r = {"benchmark": "minicpmv_ttft", "config": args.config, "error": why}
        print(json.dumps(r), flush=True)
        return [r]

    from jaxmm import LLM, SamplingParams

    path = os.path.join(args.workdir, f"minicpmv-{args.config}")
    cfg, tok = write_checkpoint(args.config, path)
    llm = LLM(
        path,
        dtype="bfloat16",
        max_model_len=8192,
        max_num_seqs=4,
        max_num_batched_tokens=max(args.max_num_batched_tokens, 64),
        kv_cache_memory_bytes=1 << 30,
        enable_prefix_caching=False,
        attention_backend=args.attention_backend,
        load_format="dummy",
    )
    runner = llm.llm_engine.runner
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def sub_images(processed) -> dict:
        return {"num_sub_images": len(processed["target_sizes"])}

    model = device = proc = None
    if not args.no_hf:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = build_hf(cfg, device)
        proc = hf_processor(args.config, tok)

    images = Images(0)
    results = []
    for size in args.sizes:
        w, h = parse_size(size)
        vlm_ttft.jaxmm_run(llm, images(w, h), sp, PROMPT, describe=sub_images)  # compiles
        vlm_ttft.jaxmm_e2e(llm, images(w, h), sp, PROMPT)
        if model is not None:
            hf_run(model, proc, images(w, h), device)
        runs, e2e, hf = [], [], []
        for _ in range(args.iters):
            runs.append(vlm_ttft.jaxmm_run(llm, images(w, h), sp, PROMPT, describe=sub_images))
            e2e.append(vlm_ttft.jaxmm_e2e(llm, images(w, h), sp, PROMPT))
            if model is not None:
                hf.append(hf_run(model, proc, images(w, h), device))
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
            "preprocess_s": vlm_ttft._median([x["preprocess_s"] for x in runs]),
            "encoder_s": vlm_ttft._median([x["encoder_s"] for x in runs]),
            "prefill_s": vlm_ttft._median([x["prefill_s"] for x in runs]),
            "e2e_s": vlm_ttft._median(e2e),
        }
        parts = r["preprocess_s"] + r["encoder_s"] + r["prefill_s"]
        r["other_s"] = round(r["e2e_s"] - parts, 4)  # hashing, tokenizing, placement
        if hf:
            r["hf_prompt_tokens"] = hf[0]["hf_prompt_tokens"]
            r["hf_processor_s"] = vlm_ttft._median([x["hf_processor_s"] for x in hf])
            r["hf_model_s"] = vlm_ttft._median([x["hf_model_s"] for x in hf])
            r["hf_e2e_s"] = vlm_ttft._median([x["hf_processor_s"] + x["hf_model_s"] for x in hf])
            r["speedup_vs_hf"] = round(r["hf_e2e_s"] / r["e2e_s"], 3)
            r["hf_device"] = str(device)
            r["hf_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        r.update(
            {
                "dtype": np.dtype(runner.dtype).name,
                "attention_backend": runner.backend,
                "max_num_batched_tokens": runner.max_num_batched_tokens,
                "device": str(jax.devices()[0].device_kind),
                "backend": jax.default_backend(),
                "jax_version": jax.__version__,
                "jaxmm_version": getattr(jaxmm, "__version__", None),
                "torch_version": torch.__version__,
                "transformers_version": transformers.__version__,
                "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d"),
            }
        )
        print(json.dumps(r), flush=True)
        results.append(r)
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
