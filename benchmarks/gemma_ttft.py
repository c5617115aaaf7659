"""Gemma 3 (4B shape, random bf16): TTFT for one 896² image vs transformers, batch-1 decode vs
the weight-streaming roofline, and KV bytes per token of context.

    python benchmarks/gemma_ttft.py                                   # GPU: gemma-3-4b shape
    python benchmarks/gemma_ttft.py --config small --iters 1 --device cpu --decode-tokens 4 8

Writes config.json (Gemma3ForConditionalGeneration with gemma-3-4b-it's shapes: SigLIP-so400m
at 896 px, 27 layers, 4096 patches pooled to 256 image tokens; a 34-layer text model with a
1024-token sliding window on 5 of every 6 layers), the Gemma3Processor's configs and a small
BPE tokenizer with `<start_of_image>`, `<end_of_image>`, `<image_soft_token>`. Weights are
random: jaxmm's `load_format="dummy"` in bf16, `Gemma3ForConditionalGeneration(config)` in
bf16 on the same device for transformers.

TTFT (one JSON line, "gemma_ttft"): one prompt with one image (a fresh random image per timed
run, so no cache serves it), prefix caching off; every piece runs once before it is timed
(compilation and CUDA start-up excluded); medians of --iters runs.
  jaxmm: preprocess_s (HF image processor as the front end calls it), encoder_s (jitted
  SigLIP + projector), prefill_s (engine steps until the first token), e2e_s (wall time of
  llm.generate(max_tokens=1), all of it plus hashing, tokenising, placeholder expansion).
  transformers: hf_processor_s (Gemma3Processor: image + text), hf_model_s (generate of one
  token, synchronised), hf_e2e_s. speedup_vs_hf = hf_e2e_s / e2e_s.
Decode (one JSON line, "gemma_decode_batch1"): time per output token of one text request,
from the difference of two output lengths (prefill cancels out), vs the roofline: every step
reads the language model's weights once (the tied embedding once, as the LM head), at the
copy bandwidth measured here (benchmarks/e2e_decode.py).
KV bytes per token at --context tokens, from the model's layout (in both lines): every layer
paged ("full_layout") against global layers paged plus one window per local layer. By default
the engine pages the layers in groups and gives local pages back behind the window
(models/gemma3.py): one text request of --context tokens runs through the engine and
"kv_bytes_per_token_page_groups" is the pages its sequence holds at its last step times the
bytes of a page, over the context (the engine is built with max_model_len past --context for
it). With --local-kv-tokens N the engine keeps rings instead ($JAXMM_GEMMA3_LOCAL_KV_TOKENS)
and "kv_bytes_per_token_measured" comes from the arrays it allocated.

transformers 5.17 (the GPU host) lacks classes 5.24 has: a missing Gemma 3 class is reported
in the JSON ("hf_error") and jaxmm's numbers still come out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import e2e_decode, vlm_ttft  # noqa: E402
from benchmarks import ttft_common as tc  # noqa: E402  (sets the JAX memory fraction first)

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
PROMPT = f"<|im_start|>user\n{BOI}Describe this image in detail.<|im_end|>\n<|im_start|>assistant\n"
CONFIGS = {
    "gemma-3-4b": dict(  # google/gemma-3-4b-it's shapes
        text=dict(
            vocab_size=262208,
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=34,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=1024,
            max_position_embeddings=131072,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            },
        ),
        vision=dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=896,
            patch_size=14,
            vision_use_head=False,
            layer_norm_eps=1e-6,
        ),
        mm_tokens_per_image=256,
    ),
    "small": dict(  # seconds on a CPU: for the smoke test
        text=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=16,
            max_position_embeddings=4096,
        ),
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            patch_size=7,
            vision_use_head=False,
        ),
        mm_tokens_per_image=16,
    ),
}


def write_checkpoint(name: str, path: str):
    """config.json + the processor's configs + tokenizer; returns (config, tokenizer)."""
    import transformers

    os.makedirs(path, exist_ok=True)
    vlm_ttft.make_tokenizer(path)
    base = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    base.add_special_tokens({"additional_special_tokens": [BOI, EOI, SOFT]})
    base.save_pretrained(path)
    named = {"boi_token": BOI, "eoi_token": EOI, "image_token": SOFT}
    try:  # the names Gemma3Processor reads (tokenizer.boi_token, ...)
        tok = transformers.PreTrainedTokenizerFast.from_pretrained(path, extra_special_tokens=named)
    except (TypeError, ValueError):  # an older transformers: without them
        tok = base
    shape = CONFIGS[name]
    if len(tok) > shape["text"]["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the vocab")
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in (BOI, EOI, SOFT)}
    cfg = transformers.Gemma3Config(
        text_config=transformers.Gemma3TextConfig(
            **shape["text"], bos_token_id=pad, eos_token_id=eos, pad_token_id=pad
        ),
        vision_config=transformers.SiglipVisionConfig(**shape["vision"]),
        mm_tokens_per_image=shape["mm_tokens_per_image"],
        boi_token_index=ids[BOI],
        eoi_token_index=ids[EOI],
        image_token_index=ids[SOFT],
    )
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(path)
    side = shape["vision"]["image_size"]
    image_processor = image_processor_class()(size={"height": side, "width": side})
    try:
        transformers.Gemma3Processor(
            image_processor=image_processor,
            tokenizer=tok,
            image_seq_length=shape["mm_tokens_per_image"],
        ).save_pretrained(path)
    except (AttributeError, TypeError, ValueError) as e:  # an older transformers' processor
        # jaxmm needs only the image processor's config; transformers' side reports this
        print(f"Gemma3Processor unavailable ({type(e).__name__}: {e})", file=sys.stderr)
        image_processor.save_pretrained(path)
    return cfg, tok


def image_processor_class():
    try:
        from transformers.models.gemma3.image_processing_pil_gemma3 import (
            Gemma3ImageProcessorPil as cls,
        )
    except ImportError:  # transformers without the PIL backend class
        from transformers.models.gemma3.image_processing_gemma3 import (
            Gemma3ImageProcessor as cls,
        )
    return cls


def kv_bytes_per_token(cfg, context: int, ring_tokens: int, itemsize: int = 2) -> dict:
    """KV bytes per token of a `context`-token sequence: every layer paged, against global
    layers paged and each local layer holding `ring_tokens` (its window plus one chunk)."""
    tc = cfg.text_config
    per_layer = 2 * tc.num_key_value_heads * tc.head_dim * itemsize  # K and V, one token
    types = list(tc.layer_types)
    n_global = types.count("full_attention")
    n_local = len(types) - n_global
    full = len(types) * per_layer
    windowed = n_global * per_layer + n_local * per_layer * min(ring_tokens, context) / context
    return {
        "context": context,
        "kv_layers_global": n_global,
        "kv_layers_local": n_local,
        "kv_bytes_per_token_full_layout": int(full),
        "kv_bytes_per_token_windowed": int(round(windowed)),
        "kv_local_tokens_per_layer": int(min(ring_tokens, context)),
        "kv_windowed_vs_full": round(windowed / full, 4),
    }


# ---------------------------------------------------------------------------------------
# jaxmm


def language_weight_bytes(runner) -> int:
    """Bytes a decode step must read: the language model's parameters (the tied embedding
    once, read as the LM head), not the vision tower's."""
    import jax

    lm = runner.params["language_model"]
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(lm)))


# ---------------------------------------------------------------------------------------
# transformers


def hf_run(model, processor, img, device, prompt: str = PROMPT) -> dict:
    """transformers' side: the processor (image + text) and one generated token, timed.
    Shared by gemma4_ttft.py (its processor and prompt)."""
    return tc.hf_processor_run(model, processor, device, prompt, "pixel_values", images=[img])


def build_hf(cfg, device):
    import transformers

    return tc.build_hf(transformers.Gemma3ForConditionalGeneration, cfg, device)


# ---------------------------------------------------------------------------------------


def parse_args(argv, configs: dict, default: str, doc: str | None = __doc__) -> argparse.Namespace:
    """The flags of this script and gemma4_ttft.py (its `configs` and docstring)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=default, choices=sorted(configs))
    tc.add_common_args(ap, max_num_batched_tokens=2048)
    ap.add_argument("--decode-tokens", type=int, nargs=2, default=[32, 160], metavar=("S", "L"))
    ap.add_argument("--context", type=int, default=32768, help="for KV bytes per token")
    ap.add_argument(
        "--local-kv-tokens",
        type=int,
        default=0,
        help="local layers keep a ring of N tokens per sequence (0: every layer paged)",
    )
    tc.add_workdir_arg(ap)
    return ap.parse_args(argv)


def set_local_kv_tokens(tokens: int) -> None:
    """Local layers on rings of `tokens` (the engine reads the switch at start), or paged."""
    from jaxmm.models.gemma3 import LOCAL_KV_ENV

    if tokens:
        os.environ[LOCAL_KV_ENV] = str(tokens)
    else:
        os.environ.pop(LOCAL_KV_ENV, None)


def measured_kv_bytes_per_token(runner, context: int) -> int:
    """KV bytes per token of a `context`-token sequence in what the engine allocated: the
    paged layers' pools per page slot, plus each sequence's rings spread over its tokens."""
    paged = runner.kv_caches[: runner.num_layers]
    per_token = sum(a.nbytes for a in paged) / (runner.num_pages * runner.block_size)
    return int(round(per_token + runner.state_bytes_per_slot / context))


def page_groups_kv(llm, context: int) -> dict:
    """With page groups: the KV bytes per token one `context`-token sequence holds at its
    last step (pages held in every group x bytes of a page / context), run through the
    engine; the most a local group may hold (a window plus one step) beside it."""
    from jaxmm import SamplingParams

    engine = llm.llm_engine
    runner, bm = engine.runner, engine.block_manager
    per_page = sum(a.nbytes for a in runner.kv_caches[: runner.num_layers]) / runner.num_pages
    held = []

    def spy(seq, num_tokens):
        ok = ensure(seq, num_tokens)
        held.append(bm.pages_held(seq))
        return ok

    ensure, bm.ensure_slots = bm.ensure_slots, spy
    try:
        sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        llm.generate([{"prompt_token_ids": [5] * (context - 1)}], sp, use_tqdm=False)
    finally:
        del bm.ensure_slots  # the class's method again
    return {
        "kv_page_groups": len(runner.kv_group_windows),
        "kv_page_arrays": runner.num_layers,
        "kv_pages_held_at_context": held[-1],
        "kv_bytes_per_token_page_groups": int(round(held[-1] * per_page / context)),
        "kv_local_pages_max_per_group": (
            runner.seq_pages_max(runner.max_num_batched_tokens) - runner.pages_per_seq
        )
        // (len(runner.kv_group_windows) - 1),
    }


def ttft_line(benchmark: str, args, llm, side: int, prompt: str, peer: tuple, tail: dict,
              attn: bool) -> dict:  # fmt: skip
    """The TTFT line of one `side`² image (module docstring), printed; shared by
    gemma4_ttft.py. `peer`: transformers' (model or None, processor, device, error or None);
    `tail`: the KV and environment fields; `attn`: with its attention implementation."""

    model, processor, device, hf_error = peer
    sp = tc.first_token()
    images = vlm_ttft.Images(0)

    def theirs(i):
        return hf_run(model, processor, images(side), device, prompt)

    (warm, _, _), (runs, e2e, hf) = tc.time_rounds(  # the warm round compiles: untimed
        args.iters,
        lambda i: vlm_ttft.jaxmm_run(llm, images(side), sp, prompt),
        lambda i: vlm_ttft.jaxmm_e2e(llm, images(side), sp, prompt),
        None if model is None else theirs,
    )
    r = {
        "benchmark": benchmark,
        "config": args.config,
        "image_size": [side, side],
        "num_image_tokens": warm["num_image_tokens"],
        "num_prompt_tokens": warm["num_prompt_tokens"],
        "iters": args.iters,
        "warm": True,
        "prefix_caching": False,
        **tc.ttft_fields(runs, e2e),
    }
    if hf:
        r.update(tc.hf_fields(hf, r["e2e_s"], device, model if attn else None))
    if hf_error:
        r["hf_error"] = hf_error
    r.update(tail)
    print(json.dumps(r), flush=True)
    return r


def decode_line(benchmark: str, args, llm, weight_bytes: int, kv: dict, env: dict) -> dict:
    """Batch-1 decode time per token against the weight-streaming roofline; printed."""
    import jax

    short, long = args.decode_tokens
    nbytes = (4 << 30) if jax.default_backend() == "gpu" else (64 << 20)
    bw = e2e_decode.copy_bandwidth(nbytes=nbytes)
    roofline_ms = weight_bytes / bw * 1e3
    tpot = e2e_decode.decode_tpot_ms(llm, short, long)
    d = {
        "benchmark": benchmark,
        "config": args.config,
        "language_weight_bytes": weight_bytes,
        "copy_bandwidth_GBps": round(bw / 1e9, 1),
        "roofline_ms_per_token": round(roofline_ms, 3),
        "engine_ms_per_token": round(tpot, 3),
        "engine_vs_roofline": round(tpot / roofline_ms, 3),
        **kv,
        **env,
    }
    print(json.dumps(d), flush=True)
    return d


def main(argv=None) -> list[dict]:
    args = parse_args(argv, CONFIGS, "gemma-3-4b")

    import transformers

    set_local_kv_tokens(args.local_kv_tokens)
    path = os.path.join(args.workdir, f"gemma3-{args.config}")
    cfg, tok = write_checkpoint(args.config, path)
    from jaxmm.models.gemma3 import RECLAIM_ENV

    # page groups (the default): the engine holds a --context sequence for the measurement
    groups = not args.local_kv_tokens and os.environ.get(RECLAIM_ENV, "1") != "0"
    llm = tc.dummy_llm(
        path,
        max(1024, args.context + 64) if groups else 1024,
        max(args.max_num_batched_tokens, 64),
        kv_bytes=(4 << 30) if groups else (1 << 30),
        attention_backend=args.attention_backend,
    )
    engine = llm.llm_engine
    runner = engine.runner
    assert engine.scheduler.whole_mm_items  # the model's mm_whole_items (models/gemma3.py)
    ring = args.local_kv_tokens or cfg.text_config.sliding_window + runner.max_num_batched_tokens
    kv = kv_bytes_per_token(cfg, args.context, ring)
    kv["local_kv_tokens"] = args.local_kv_tokens
    if args.local_kv_tokens:  # what the engine allocated: pages of global layers, rings
        kv["kv_bytes_per_token_measured"] = measured_kv_bytes_per_token(runner, args.context)
    elif len(runner.kv_group_windows) > 1:  # what one sequence holds with page groups
        kv.update(page_groups_kv(llm, args.context))
    env = tc.env_fields(runner)

    model = device = processor = None
    hf_error = None
    if not args.no_hf:
        device = tc.torch_device(args.device)
        # an older transformers without a class or a processor this script uses: hf_error
        built, hf_error = tc.try_hf(
            lambda: (build_hf(cfg, device), transformers.AutoProcessor.from_pretrained(path))
        )
        model, processor = built or (None, None)

    side = cfg.vision_config.image_size
    peer = (model, processor, device, hf_error)
    r = ttft_line("gemma_ttft", args, llm, side, PROMPT, peer, {**kv, **env}, attn=True)
    d = decode_line("gemma_decode_batch1", args, llm, language_weight_bytes(runner), kv, env)
    return [r, d]


if __name__ == "__main__":
    main()
