"""Qwen3.5-MoE (Qwen3.5-35B-A3B's text model shape, random bf16 weights): batch-1 decode
against its active-bytes roofline, with transformers on the same device as the peer.

    python benchmarks/qwen3_5_moe_decode.py                    # 20 of 40 layers: one H100
    python benchmarks/qwen3_5_moe_decode.py --layers 40        # the whole depth: an H200
    python benchmarks/qwen3_5_moe_decode.py --parts jaxmm      # without the peer
    python benchmarks/qwen3_5_moe_decode.py --config tiny      # CPU smoke run

- jaxmm: ms per output token of one stream (LLM.generate, from the difference of two output
  lengths so prefill cancels out) and the bare jitted step (`hybrid_decode.decode_rates`),
  against the roofline: the bytes one token must read, i.e. every parameter except the
  routed experts, k of the E experts of each layer (the shared expert always), and each
  linear layer's conv and recurrent state read and written once, over the measured copy
  bandwidth. The full-attention layers' KV (a 16-token prompt) is negligible and left out.
  Depth scales weights and roofline alike, so `--layers 20` keeps the ratio meaningful.
- hf: transformers' Qwen3_5MoeForCausalLM, same config, random bf16 weights made on the GPU
  (its PyTorch fallback for the linear layers unless flash-linear-attention is installed),
  batch-1 decode ms per token from two output lengths.
Each part runs in its own process (both want the whole GPU). One JSON line. A transformers
without Qwen3.5-MoE (`Qwen3_5MoeTextConfig`, transformers >= 5.2) is reported, not crashed on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = {
    # Qwen3.5-35B-A3B's text model (transformers' Qwen3_5MoeTextConfig defaults)
    "qwen3.5-35b-a3b": dict(
        hidden_size=2048,
        num_hidden_layers=40,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        num_experts=256,
        num_experts_per_tok=8,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        vocab_size=248320,
        max_position_embeddings=4096,
        torch_dtype="bfloat16",
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        vocab_size=512,
        max_position_embeddings=1024,
        torch_dtype="float32",
    ),
}


def hf_config(name: str, layers: int | None = None) -> dict:
    cfg = dict(CONFIGS[name])
    n = layers or cfg["num_hidden_layers"]
    kinds = ["linear_attention"] * 3 + ["full_attention"]  # three linear layers per full one
    cfg.update(
        num_hidden_layers=n,
        architectures=["Qwen3_5MoeForCausalLM"],
        model_type="qwen3_5_moe_text",
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=False,
        layer_types=[kinds[i % 4] for i in range(n)],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
        },
    )
    return cfg


def active_bytes(params, k: int) -> int:
    """Bytes one token reads: every parameter, but of each layer's routed expert stacks
    (E, ...) only k of the E experts."""
    from flax import nnx

    total = 0
    for path, leaf in nnx.to_flat_state(params):
        nbytes = leaf.get_value().nbytes
        routed = "experts" in path and "shared_expert" not in path
        total += nbytes * k // leaf.get_value().shape[0] if routed else nbytes
    return total


def part_jaxmm(args, cfg: dict) -> dict:
    import jax

    from benchmarks.e2e_decode import copy_bandwidth
    from benchmarks.hybrid_decode import decode_rates
    from benchmarks.throughput import write_config
    from jaxmm import LLM

    path = os.path.join(args.workdir, f"{args.config}-{cfg['num_hidden_layers']}l")
    write_config(cfg, path)
    llm = LLM(
        path,
        dtype=args.dtype,
        max_model_len=1024,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        skip_tokenizer_init=True,
        load_format="dummy",
    )
    runner = llm.llm_engine.runner
    weights = active_bytes(runner.params, cfg["num_experts_per_tok"])
    state = runner.state_bytes_per_slot
    bw = copy_bandwidth(1 << 30 if jax.default_backend() != "cpu" else 1 << 24)
    roofline_ms = (weights + 2 * state) / bw * 1e3
    rates = decode_rates(llm, args)
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(runner.params))
    return dict(
        total_weight_bytes=int(total),
        active_weight_bytes=int(weights),
        state_bytes_per_sequence=int(state),
        copy_bandwidth_GBps=round(bw / 1e9, 1),
        roofline_ms_per_token=round(roofline_ms, 3),
        engine_ms_per_token=round(rates["engine_ms_per_token"], 3),
        engine_vs_roofline=round(rates["engine_ms_per_token"] / roofline_ms, 3),
        device_step_ms=round(rates["device_step_ms"], 3),
        device_step_vs_roofline=round(rates["device_step_ms"] / roofline_ms, 3),
        device=str(jax.devices()[0].device_kind),
        jax_version=jax.__version__,
        attention_backend=runner.backend,
    )


def part_hf(args, cfg: dict) -> dict:
    import torch
    import transformers

    from benchmarks.hybrid_decode import hf_cuda_model, hf_generate_s

    if not torch.cuda.is_available():
        return {"hf_error": "no CUDA device for the transformers peer"}
    model = hf_cuda_model(
        transformers.Qwen3_5MoeTextConfig, transformers.Qwen3_5MoeForCausalLM, cfg
    )

    def gen(n: int) -> float:
        return hf_generate_s(model, n)

    gen(4)
    shorts = [gen(args.short) for _ in range(2)]
    longs = [gen(args.long) for _ in range(2)]
    tpot = (np.median(longs) - np.median(shorts)) / (args.long - args.short) * 1e3
    return {
        "hf_ms_per_token": round(float(tpot), 3),
        "hf_device": torch.cuda.get_device_name(),
        "torch_version": torch.__version__,
    }


PARTS = {"jaxmm": part_jaxmm, "hf": part_hf}


def _run_part(part: str, argv: list[str]) -> dict:
    """One part in a fresh process; its last stdout line is its JSON."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--part-only", part]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {f"{part}_error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="qwen3.5-35b-a3b", choices=sorted(CONFIGS))
    ap.add_argument("--layers", type=int, default=None, help="default 20 (tiny: 4)")
    ap.add_argument("--parts", nargs="+", default=["jaxmm", "hf"], choices=sorted(PARTS))
    ap.add_argument("--dtype", default=None, help="default: bfloat16 (float32 for tiny)")
    ap.add_argument("--short", type=int, default=None)
    ap.add_argument("--long", type=int, default=None)
    ap.add_argument("--in-process", action="store_true", help="no subprocess per part")
    ap.add_argument("--part-only", default=None, choices=sorted(PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxmm-bench"))
    args = ap.parse_args(argv)
    tiny = args.config == "tiny"
    args.layers = args.layers or (4 if tiny else 20)
    args.dtype = args.dtype or ("float32" if tiny else "bfloat16")
    args.short = args.short or (4 if tiny else 32)
    args.long = args.long or (12 if tiny else 160)
    cfg = hf_config(args.config, args.layers)

    if args.part_only:  # a child process: that part's JSON only
        out = PARTS[args.part_only](args, cfg)
        print(json.dumps(out), flush=True)
        return out

    result = {
        "benchmark": "qwen3_5_moe_decode",
        "config": args.config,
        "num_hidden_layers": args.layers,
        "dtype": args.dtype,
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import transformers

        result["transformers_version"] = transformers.__version__
        transformers.Qwen3_5MoeTextConfig  # noqa: B018 (the engine reads the config through it)
    except (ImportError, AttributeError) as e:
        result["error"] = f"this transformers has no Qwen3.5-MoE ({e}); needs transformers>=5.2"
        print(json.dumps(result), flush=True)
        return result
    for part in args.parts:
        out = PARTS[part](args, cfg) if args.in_process else _run_part(part, argv)
        result.update(out)
    if "hf_ms_per_token" in result and "engine_ms_per_token" in result:
        result["hf_vs_engine"] = round(result["hf_ms_per_token"] / result["engine_ms_per_token"], 3)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
