"""The peer for benchmarks/throughput.py: HF transformers + torch on the same workload.

    python benchmarks/hf_throughput.py --config llama-3.1-8b --num-prompts 512 \
        --input-len 512 --output-len 256 --batch 64 [--static]

Random bf16 weights initialised on the GPU, `generate` with sdpa attention in batches of
`--batch` (ignore EOS: min_new_tokens = max_new_tokens). `--static` uses
cache_implementation="static" (compiled decode step; compiling takes minutes). One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.throughput import CONFIGS  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--static", action="store_true")
    args = ap.parse_args(argv)

    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(CONFIGS[args.config])
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    cfg.pop("torch_dtype", None)
    config = LlamaConfig(**cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.config._attn_implementation = "sdpa"
    kw = dict(
        max_new_tokens=args.output_len,
        min_new_tokens=args.output_len,
        do_sample=False,
        pad_token_id=0,
    )
    if args.static:
        kw["cache_implementation"] = "static"
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (args.num_prompts, args.input_len), generator=g)

    def run(batch):
        x = batch.to(device)
        with torch.no_grad():
            return model.generate(x, attention_mask=torch.ones_like(x), **kw)

    run(prompts[: min(args.batch, args.num_prompts)])  # warm-up (and compile, if static)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out_tokens = 0
    for i in range(0, args.num_prompts, args.batch):
        y = run(prompts[i : i + args.batch])
        out_tokens += (y.shape[1] - args.input_len) * y.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    result = {
        "benchmark": "throughput_hf",
        "config": args.config,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "batch": args.batch,
        "static_cache": args.static,
        "elapsed_s": round(elapsed, 3),
        "output_tokens_per_s": round(out_tokens / elapsed, 2),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
