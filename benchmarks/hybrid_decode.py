"""Qwen3.5 hybrid (Gated DeltaNet + full attention) with random bf16 weights: batch-1 decode vs
its roofline, and long-prompt prefill against a full-attention model of the same size.

    python benchmarks/hybrid_decode.py --config qwen3.5-9b [--prefill-len 32768] [--hf]
    python benchmarks/hybrid_decode.py --config tiny          # CPU smoke run

1. Decode, batch 1: the engine's time per output token (LLM.generate, from the difference of
   two output lengths so prefill cancels out) and the bare jitted step on device, against
   the roofline: every token reads all weights once and reads and writes each linear
   layer's state once (state bytes x 2), at the copy bandwidth measured here.
2. Prefill of one `--prefill-len` prompt in chunks of `--chunk` tokens (the state carried
   from chunk to chunk), for the hybrid and for the same model with every layer full
   attention (`layer_types` all "full_attention"): the hybrid's reason to exist.
3. `--hf`: transformers on the same GPU as the peer (its PyTorch path, or
   flash-linear-attention where installed): decode time per token and the prefill time.
One JSON line. Needs a transformers with Qwen3.5 (`Qwen3_5TextConfig`); says so otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.e2e_decode import decode_tpot_ms, device_step_time_ms  # noqa: E402
from benchmarks.throughput import device_rates, write_config  # noqa: E402

CONFIGS = {
    # Qwen3.5-9B's text model (transformers' Qwen3_5TextConfig defaults)
    "qwen3.5-9b": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        vocab_size=248320,
        max_position_embeddings=65536,
        torch_dtype="bfloat16",
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        vocab_size=512,
        max_position_embeddings=4096,
        torch_dtype="float32",
    ),
}


def hf_config(name: str, full_attention: bool) -> dict:
    cfg = dict(CONFIGS[name])
    n = cfg["num_hidden_layers"]
    kinds = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
    cfg.update(
        architectures=["Qwen3_5ForCausalLM"],
        model_type="qwen3_5_text",
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=False,
        layer_types=["full_attention"] * n if full_attention else [kinds[i % 4] for i in range(n)],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
        },
    )
    return cfg


def _engine(path: str, args, max_model_len: int):
    from jaxmm import LLM

    return LLM(
        path,
        dtype=args.dtype,
        max_model_len=max_model_len,
        # state slots: decode must not slow down with more of them (in-place updates);
        # the prefill chunk layout grows with them
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.chunk,
        skip_tokenizer_init=True,
        load_format="dummy",
        attention_backend=args.attention_backend,
    )


def _prefill_s(runner, length: int, chunk: int) -> float:
    """Seconds to prefill one `length`-token prompt in `chunk`-token steps (second run)."""
    import jax

    from jaxmm.runner.model_runner import SeqStep

    G = runner.block_size
    table = list(range(math.ceil(length / G)))
    ids = (np.arange(length) % 1000 + 1).tolist()

    def run() -> float:
        t0 = time.perf_counter()
        out = None
        for s in range(0, length, chunk):
            part = ids[s : s + chunk]
            step = SeqStep(
                part, start=s, block_table=table, sample=s + len(part) == length, state_slot=0
            )
            out = runner.dispatch([step])
        jax.block_until_ready(out.tokens)
        return time.perf_counter() - t0

    run()  # compiles the chunk buckets
    return min(run() for _ in range(2))


def decode_rates(llm, args) -> dict:
    """Engine time per output token and the bare device step, batch 1."""
    from jaxmm.runner.model_runner import SeqStep

    tpot_ms = decode_tpot_ms(llm, args.short, args.long)

    runner = llm.llm_engine.runner
    step = SeqStep(token_ids=[5], start=99, block_table=list(range(8)), sample=True, state_slot=0)
    runner.execute([step])
    device_ms = device_step_time_ms(runner, step, 30)
    return {"engine_ms_per_token": float(tpot_ms), "device_step_ms": float(device_ms)}


HF_ONLY_KEYS = ("architectures", "model_type", "torch_dtype")  # config.json, not the class


def hf_cuda_model(config_cls, model_cls, cfg: dict):
    """transformers' `model_cls` of the config dict `cfg`, random bf16 weights made on the GPU.
    Shared by qwen3_5_moe_decode.py."""
    import torch

    conf = config_cls(**{k: v for k, v in cfg.items() if k not in HF_ONLY_KEYS})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = model_cls(conf).eval()
    torch.set_default_dtype(torch.float32)
    return model


def hf_generate_s(model, n: int) -> float:
    """Seconds for `model` to generate exactly n tokens after a 16-token prompt, batch 1."""
    import torch

    x = torch.arange(1, 17, device="cuda")[None]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def hf_peer(cfg: dict, args) -> dict:
    """transformers' Qwen3_5ForCausalLM with random weights on this GPU: decode ms/token
    (batch 1, from two output lengths) and the prefill time of one prompt."""
    import torch
    import transformers

    if not torch.cuda.is_available():
        return {"hf_error": "no CUDA device for the transformers peer"}
    model = hf_cuda_model(transformers.Qwen3_5TextConfig, transformers.Qwen3_5ForCausalLM, cfg)

    def gen(n: int) -> float:
        return hf_generate_s(model, n)

    gen(4)
    tpot = (gen(args.long) - gen(args.short)) / (args.long - args.short) * 1e3
    x = (torch.arange(args.prefill_len, device="cuda") % 1000 + 1)[None]
    try:
        with torch.no_grad():
            model(x[:, :1024])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x, logits_to_keep=1)
            torch.cuda.synchronize()
        prefill = time.perf_counter() - t0
    except torch.OutOfMemoryError as e:  # its PyTorch path keeps every chunk's temporaries
        prefill = f"out of memory: {str(e)[:120]}"
    return {"hf_ms_per_token": round(tpot, 3), "hf_prefill_s": prefill}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--dtype", default=None, help="default: bfloat16 (float32 for tiny)")
    ap.add_argument("--prefill-len", type=int, default=None, help="default 32768 (tiny: 100)")
    ap.add_argument("--chunk", type=int, default=None, help="prefill step tokens (8192; 32)")
    ap.add_argument("--short", type=int, default=None)
    ap.add_argument("--long", type=int, default=None)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--max-num-seqs", type=int, default=4, help="state slots (and seqs)")
    ap.add_argument("--hf", action="store_true", help="also time transformers (GPU)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxmm-bench"))
    args = ap.parse_args(argv)
    tiny = args.config == "tiny"
    args.dtype = args.dtype or ("float32" if tiny else "bfloat16")
    args.prefill_len = args.prefill_len or (100 if tiny else 32768)
    args.chunk = args.chunk or (32 if tiny else 8192)
    args.short = args.short or (4 if tiny else 32)
    args.long = args.long or (12 if tiny else 160)

    import jax

    result = {
        "benchmark": "hybrid_decode",
        "config": args.config,
        "max_num_seqs": args.max_num_seqs,
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import transformers

        result["transformers_version"] = transformers.__version__
        transformers.Qwen3_5TextConfig  # noqa: B018 (the engine reads the config through it)
    except (ImportError, AttributeError) as e:
        result["error"] = f"this transformers has no Qwen3.5 ({e}); install transformers>=5.2"
        print(json.dumps(result), flush=True)
        return result

    flops, bw = device_rates(reps=2 if tiny else 5)
    result["copy_bandwidth_GBps"] = round(bw / 1e9, 1)
    max_len = args.prefill_len + args.long + 64
    for name, full in (("hybrid", False), ("full_attention", True)):
        cfg = hf_config(args.config, full)
        path = os.path.join(args.workdir, f"{args.config}-{name}")
        write_config(cfg, path)
        llm = _engine(path, args, max_len)
        runner = llm.llm_engine.runner
        row = {"prefill_s": round(_prefill_s(runner, args.prefill_len, args.chunk), 4)}
        if not full:
            weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(runner.params))
            state_bytes = runner.state_bytes_per_slot
            roofline_ms = (weight_bytes + 2 * state_bytes) / bw * 1e3
            rates = decode_rates(llm, args)
            row.update(
                weight_bytes=int(weight_bytes),
                state_bytes_per_sequence=int(state_bytes),
                roofline_ms_per_token=round(roofline_ms, 3),
                engine_ms_per_token=round(rates["engine_ms_per_token"], 3),
                engine_vs_roofline=round(rates["engine_ms_per_token"] / roofline_ms, 3),
                device_step_ms=round(rates["device_step_ms"], 3),
                device_step_vs_roofline=round(rates["device_step_ms"] / roofline_ms, 3),
            )
        result[name] = row
        del llm, runner
        gc.collect()
    result["prefill_len"] = args.prefill_len
    result["prefill_chunk"] = args.chunk
    result["prefill_hybrid_vs_full"] = round(
        result["hybrid"]["prefill_s"] / result["full_attention"]["prefill_s"], 3
    )
    if args.hf:
        result.update(hf_peer(hf_config(args.config, False), args))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
