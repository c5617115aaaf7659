"""Time to first token, one image: jaxmm vs transformers on a random-weight Qwen3-VL.

    python benchmarks/qwen3_vl_ttft.py --config qwen3-vl-2b --sizes 448 1344     # GPU
    python benchmarks/qwen3_vl_ttft.py --config qwen3-vl-4b --sizes 448 1344     # GPU
    python benchmarks/qwen3_vl_ttft.py --config small --sizes 256 384 --iters 1  # CPU smoke

The method, the timed pieces and the JSON fields are `vlm_ttft.py`'s (its helpers are reused:
tokenizer, images, the jaxmm split timings, the HF inputs and timing); what differs is the
checkpoint: config.json of `Qwen3VLForConditionalGeneration` at the Qwen3-VL-2B-Instruct (or
4B) shape, with DeepStack levels at vision blocks 5, 11, 17 and interleaved M-RoPE, and the
real checkpoint's image processor settings (patch 16, mean/std 0.5, a pixel budget that keeps
1344x1344 as is: 84x84 patches, 1764 image tokens; 448x448: 196). Weights are random bf16:
jaxmm's `load_format="dummy"`, and `Qwen3VLForConditionalGeneration(config)` in bf16 on the
same device for transformers. One JSON line per size, "benchmark": "qwen3_vl_ttft".

transformers must know Qwen3-VL (4.57 or later): without `Qwen3VLConfig` neither side can
read the checkpoint and the script exits with that message; `--no-hf` times jaxmm alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from benchmarks import ttft_common as tc  # noqa: E402  (sets the JAX memory fraction first)
from benchmarks import vlm_ttft  # noqa: E402

_TEXT_COMMON = dict(
    vocab_size=151936,
    head_dim=128,
    max_position_embeddings=262144,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
    tie_word_embeddings=True,
)
_VISION_COMMON = dict(
    depth=24,
    hidden_size=1024,
    intermediate_size=4096,
    num_heads=16,
    hidden_act="gelu_pytorch_tanh",
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    in_channels=3,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[5, 11, 17],
)
# Qwen3-VL-2B-Instruct's and -4B-Instruct's shapes
CONFIGS = {
    "qwen3-vl-2b": dict(
        text=dict(
            _TEXT_COMMON,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
        ),
        vision=dict(_VISION_COMMON, out_hidden_size=2048),
    ),
    "qwen3-vl-4b": dict(
        text=dict(
            _TEXT_COMMON,
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
        ),
        vision=dict(_VISION_COMMON, out_hidden_size=2560),
    ),
    "small": dict(  # seconds on a CPU: for the smoke test
        text=dict(
            _TEXT_COMMON,
            vocab_size=512,
            head_dim=16,
            max_position_embeddings=8192,
            rope_parameters=dict(_TEXT_COMMON["rope_parameters"], mrope_section=[2, 3, 3]),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        vision=dict(
            _VISION_COMMON,
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
            out_hidden_size=64,
        ),
    ),
}
PREPROCESSOR = {  # Qwen3-VL-2B-Instruct's image processor settings
    "image_processor_type": "Qwen2VLImageProcessor",
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


def qwen3_vl_classes():
    """(config class, model class) of the installed transformers, or exit saying why not."""
    import transformers

    cfg = getattr(transformers, "Qwen3VLConfig", None)
    model = getattr(transformers, "Qwen3VLForConditionalGeneration", None)
    if cfg is None or model is None:
        sys.exit(
            f"transformers {transformers.__version__} has no Qwen3VLConfig / "
            "Qwen3VLForConditionalGeneration (added in 4.57): it cannot read a Qwen3-VL "
            "checkpoint, for jaxmm (which reads multimodal configs through it) or as the peer"
        )
    return cfg, model


def write_checkpoint(name: str, path: str):
    """config.json + preprocessor_config.json + tokenizer; returns (config, tokenizer)."""
    config_cls, _ = qwen3_vl_classes()
    os.makedirs(path, exist_ok=True)
    tok = vlm_ttft.make_tokenizer(path)
    shape = CONFIGS[name]
    if len(tok) > shape["text"]["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the vocab")
    ids = {t: tok.convert_tokens_to_ids(t) for t in vlm_ttft.SPECIALS}
    cfg = config_cls(
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
        tie_word_embeddings=shape["text"]["tie_word_embeddings"],
    )
    cfg.architectures = ["Qwen3VLForConditionalGeneration"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR, f, indent=1)
    return cfg, tok


def build_hf(cfg, device):
    return tc.build_hf(qwen3_vl_classes()[1], cfg, device)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="qwen3-vl-2b", choices=sorted(CONFIGS))
    ap.add_argument("--sizes", type=int, nargs="+", default=[448, 1344])
    tc.add_common_args(ap, max_num_batched_tokens=4096)
    tc.add_workdir_arg(ap)
    args = ap.parse_args(argv)

    path = os.path.join(args.workdir, f"qwen3-vl-{args.config}")
    cfg, tok = write_checkpoint(args.config, path)
    unit = PREPROCESSOR["patch_size"] * PREPROCESSOR["merge_size"]
    longest = max((s // unit) ** 2 for s in args.sizes) + 64  # image tokens + the text
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
        device = tc.torch_device(args.device)
        model = build_hf(cfg, device)

    images = vlm_ttft.Images(0)
    results = []
    for size in args.sizes:
        fresh = functools.partial(images, size)  # warm: one untimed round (compiles)
        _, (runs, e2e, hf) = vlm_ttft.size_rounds(
            args.iters, llm, sp, fresh, model, path, tok, device
        )
        r = {
            "benchmark": "qwen3_vl_ttft",
            "config": args.config,
            "architecture": "Qwen3VLForConditionalGeneration",
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
        r.update(
            tc.env_fields(
                runner,
                encoder_row_width=runner.mm_row_width,  # embedding + DeepStack levels
                image_processor=type(ip).__name__,
                jaxmm_version=True,
            )
        )
        print(json.dumps(r), flush=True)
        results.append(r)
    return results


if __name__ == "__main__":
    main()
