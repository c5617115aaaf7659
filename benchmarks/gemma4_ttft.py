"""Gemma 4 (E2B shape, random bf16): TTFT for one 896² image vs transformers, batch-1 decode vs
the weight-streaming roofline, and KV bytes per token of context.

    python benchmarks/gemma4_ttft.py                                  # GPU: gemma-4-E2B shape
    python benchmarks/gemma4_ttft.py --config small --iters 1 --device cpu --decode-tokens 4 8

Writes config.json (Gemma4ForConditionalGeneration, text and vision only, with the shapes of
google/gemma-4-E2B-it as transformers' Gemma 4 docs describe them: 35 layers of width 1536,
four local layers (window 512, head 256) to one global (head 512), the last 20 layers reading
the K/V of earlier ones, per-layer inputs of 256; a 16-layer vision tower of width 768 at
patch 16, pooled 3x3, 280 soft tokens at most, so an 896² image becomes 768² = 256 tokens),
the Gemma4Processor's configs and a small BPE tokenizer with Gemma 4's image tokens. Weights
are random: jaxmm's `load_format="dummy"` in bf16, `Gemma4ForConditionalGeneration(config)`
in bf16 on the same device for transformers.

The TTFT and decode measurements are gemma_ttft.py's (same pieces, same JSON fields; lines
"gemma4_ttft" and "gemma4_decode_batch1"). KV bytes per token at --context tokens, from the
model's layout (models/gemma4.py):
  kv_bytes_per_token_padded       every layer paged at the largest K x H (one pool shape)
  kv_bytes_per_token_full_layout  every layer paged at its own shape, no KV sharing
  kv_bytes_per_token_shared       what jaxmm allocates: one pool per layer computing K/V
  kv_bytes_per_token_windowed     and local layers on rings of window + one step
With --local-kv-tokens N the engine runs on rings and "kv_bytes_per_token_measured" comes
from the arrays it allocated.

transformers 5.17 (the GPU host) may lack Gemma 4: a missing class is reported in the JSON
("hf_error") and jaxmm's numbers still come out.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import gemma_ttft, vlm_ttft  # noqa: E402
from benchmarks import ttft_common as tc  # noqa: E402  (sets the JAX memory fraction first)

SPECIALS = {  # the names Gemma4Processor reads off its tokenizer
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
}
PROMPT = (
    "<|im_start|>user\n<|image|>Describe this image in detail.<|im_end|>\n<|im_start|>assistant\n"
)
S, F = "sliding_attention", "full_attention"
ROPE = {
    S: {"rope_type": "default", "rope_theta": 10_000.0},
    F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
}
CONFIGS = {
    "gemma-4-e2b": dict(
        text=dict(
            vocab_size=262144,
            vocab_size_per_layer_input=262144,
            hidden_size=1536,
            intermediate_size=6144,
            num_hidden_layers=35,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=256,
            global_head_dim=512,
            sliding_window=512,
            layer_types=([S] * 4 + [F]) * 7,
            num_kv_shared_layers=20,
            use_double_wide_mlp=True,
            hidden_size_per_layer_input=256,
            final_logit_softcapping=30.0,
            max_position_embeddings=131072,
            rope_parameters=ROPE,
        ),
        vision=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=16,
            num_attention_heads=12,
            num_key_value_heads=12,
            head_dim=64,
            patch_size=16,
            pooling_kernel_size=3,
            position_embedding_size=10240,
            standardize=True,
        ),
        max_soft_tokens=280,
        image_size=896,
    ),
    "small": dict(  # seconds on a CPU: for the smoke test
        text=dict(
            vocab_size=512,
            vocab_size_per_layer_input=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            global_head_dim=32,
            sliding_window=16,
            layer_types=[S, S, F, S, S, F],
            num_kv_shared_layers=3,
            use_double_wide_mlp=True,
            hidden_size_per_layer_input=8,
            final_logit_softcapping=30.0,
            max_position_embeddings=4096,
            rope_parameters=ROPE,
        ),
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            patch_size=4,
            pooling_kernel_size=3,
            position_embedding_size=128,
        ),
        max_soft_tokens=70,
        image_size=96,
    ),
}


def write_checkpoint(name: str, path: str):
    """config.json + the processor's configs + tokenizer; returns (config, processor or None)."""
    import transformers

    try:
        from transformers.models.gemma4.image_processing_pil_gemma4 import (
            Gemma4ImageProcessorPil as image_processor_cls,
        )
    except ImportError:  # transformers without the PIL backend class
        from transformers.models.gemma4.image_processing_gemma4 import (
            Gemma4ImageProcessor as image_processor_cls,
        )

    os.makedirs(path, exist_ok=True)
    vlm_ttft.make_tokenizer(path)
    base = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    base.add_special_tokens({"additional_special_tokens": list(SPECIALS.values())})
    base.save_pretrained(path)
    try:  # the names Gemma4Processor reads (tokenizer.image_token, ...)
        tok = transformers.PreTrainedTokenizerFast.from_pretrained(
            path, extra_special_tokens=SPECIALS
        )
    except (TypeError, ValueError):  # an older transformers: without them
        tok = base
    shape = CONFIGS[name]
    v = shape["vision"]
    image_processor = image_processor_cls(
        patch_size=v["patch_size"],
        pooling_kernel_size=v["pooling_kernel_size"],
        max_soft_tokens=shape["max_soft_tokens"],
    )
    processor = None
    try:
        processor = build_processor(transformers, image_processor, tok, shape)
        processor.save_pretrained(path)  # adds <|video|> to the tokenizer
        tok = processor.tokenizer
    except (AttributeError, ImportError, NameError, TypeError, ValueError) as e:
        # jaxmm needs only the image processor's config; transformers' side reports this
        print(f"Gemma4Processor unavailable ({type(e).__name__}: {e})", file=sys.stderr)
        image_processor.save_pretrained(path)
        tok.add_special_tokens({"additional_special_tokens": ["<|video|>"]})
        tok.save_pretrained(path)
    if len(tok) > shape["text"]["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the vocab")
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in SPECIALS.items()}
    cfg = transformers.Gemma4Config(
        text_config=transformers.Gemma4TextConfig(
            **shape["text"], bos_token_id=pad, eos_token_id=eos, pad_token_id=pad
        ),
        vision_config=transformers.Gemma4VisionConfig(**v),
        boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"],
        image_token_id=ids["image_token"],
        video_token_id=tok.convert_tokens_to_ids("<|video|>"),
        boa_token_id=ids["boa_token"],
        eoa_token_index=ids["eoa_token"],
        audio_token_id=ids["audio_token"],
    )
    cfg.architectures = ["Gemma4ForConditionalGeneration"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(path)
    return cfg, processor


def build_processor(transformers, image_processor, tok, shape):
    """Gemma4Processor; its video processor needs torchvision, else a stand-in (no video is
    processed) under transformers' check for one."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    try:
        from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

        video = Gemma4VideoProcessor()
    except (ImportError, NameError):
        from transformers.video_processing_utils import BaseVideoProcessor

        class Gemma4VideoProcessor(BaseVideoProcessor):
            model_input_names = ["pixel_values_videos", "video_position_ids"]

        video = Gemma4VideoProcessor()
    import transformers.processing_utils as pu
    from transformers.video_processing_utils import VideoProcessorMixin

    module = pu.transformers_module
    patched = not hasattr(module, "VideoProcessorMixin")
    if patched:  # exported only with torchvision installed
        module.VideoProcessorMixin = VideoProcessorMixin
    try:
        return transformers.Gemma4Processor(
            feature_extractor=Gemma4AudioFeatureExtractor(),
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=video,
            image_seq_length=shape["max_soft_tokens"],
        )
    finally:
        if patched:
            delattr(module, "VideoProcessorMixin")


def kv_bytes_per_token(cfg, context: int, ring_tokens: int, itemsize: int = 2) -> dict:
    """KV bytes per token of a `context`-token sequence under each layout (module docstring)."""
    from jaxmm.models.gemma4 import kv_sharing, layer_shape

    tc = cfg.text_config
    n = tc.num_hidden_layers
    shapes = [layer_shape(tc, i) for i in range(n)]
    producer = kv_sharing(tc)
    kinds = list(tc.layer_types)
    per = [2 * K * H * itemsize for K, H in shapes]  # K and V of one token, per layer
    own = [i for i in range(n) if producer[i] is None]
    local = [i for i in own if kinds[i] == S]
    shared = sum(per[i] for i in own)
    keep = min(ring_tokens, context) / context
    windowed = shared - sum(per[i] for i in local) * (1 - keep)
    padded = n * 2 * max(K for K, _ in shapes) * max(H for _, H in shapes) * itemsize
    full = sum(per)
    return {
        "context": context,
        "kv_layers": n,
        "kv_layers_computing_kv": len(own),
        "kv_layers_local_computing_kv": len(local),
        "kv_bytes_per_token_padded": int(padded),
        "kv_bytes_per_token_full_layout": int(full),
        "kv_bytes_per_token_shared": int(shared),
        "kv_bytes_per_token_windowed": int(round(windowed)),
        "kv_local_tokens_per_layer": int(min(ring_tokens, context)),
        "kv_windowed_vs_full": round(windowed / full, 4),
        "kv_shared_vs_padded": round(shared / padded, 4),
    }


def language_weight_bytes(runner) -> int:
    """Bytes a decode step must read: the language model's parameters (the tied embedding
    once, as the LM head) without the per-layer input table, of which a step reads only its
    tokens' rows (262144 x 35 x 256 in E2B: 4.7 GB in bf16, more than the rest)."""
    import jax

    lm = runner.params["language_model"]
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(lm))
    ple = lm["model"].get("embed_tokens_per_layer") if "model" in lm else None
    return int(total - sum(x.nbytes for x in jax.tree_util.tree_leaves(ple or {})))


def hf_peer(args, cfg, processor) -> tuple:
    """transformers' (model, device, error): no model with --no-hf, without a processor or
    where this transformers cannot build one (then the error says why). Shared by
    gemma4_audio_ttft.py."""
    import transformers

    if processor is None:
        return None, None, "Gemma4Processor unavailable"
    if args.no_hf:
        return None, None, None
    device = tc.torch_device(args.device)
    model, error = tc.try_hf(
        lambda: tc.build_hf(transformers.Gemma4ForConditionalGeneration, cfg, device)
    )
    return model, device, error


def main(argv=None) -> list[dict]:
    args = gemma_ttft.parse_args(argv, CONFIGS, "gemma-4-e2b", __doc__)

    import transformers

    if not hasattr(transformers, "Gemma4Config"):  # jaxmm reads the config through it too
        error = (
            f"transformers {transformers.__version__} has no Gemma4Config: Gemma 4 "
            "needs a transformers with Gemma 4 (5.24 has it)"
        )
        return tc.error_line("gemma4_ttft", args.config, error)

    gemma_ttft.set_local_kv_tokens(args.local_kv_tokens)
    path = os.path.join(args.workdir, f"gemma4-{args.config}")
    cfg, processor = write_checkpoint(args.config, path)
    llm = tc.dummy_llm(
        path, 1024, max(args.max_num_batched_tokens, 128), attention_backend=args.attention_backend
    )
    runner = llm.llm_engine.runner
    ring = args.local_kv_tokens or cfg.text_config.sliding_window + runner.max_num_batched_tokens
    kv = kv_bytes_per_token(cfg, args.context, ring)
    kv["local_kv_tokens"] = args.local_kv_tokens
    # what the engine allocated: one pool per paged layer, each its own shape (+ rings)
    kv["kv_bytes_per_token_measured"] = gemma_ttft.measured_kv_bytes_per_token(runner, args.context)
    env = tc.env_fields(runner, python=False)

    model, device, hf_error = hf_peer(args, cfg, processor)

    side = CONFIGS[args.config]["image_size"]
    peer = (model, processor, device, hf_error)
    tail = {**kv, **env}
    r = gemma_ttft.ttft_line("gemma4_ttft", args, llm, side, PROMPT, peer, tail, attn=False)
    d = gemma_ttft.decode_line(
        "gemma4_decode_batch1", args, llm, language_weight_bytes(runner), kv, env
    )
    return [r, d]


if __name__ == "__main__":
    main()
