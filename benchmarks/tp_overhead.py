"""What the tensor-parallel attention path costs at TP 1: the same model with attention under
`jax.shard_map` (the default) and without it ($JAXMM_ATTENTION_SHARD_MAP=0), in one run.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python benchmarks/tp_overhead.py   # 8B, bf16
    python benchmarks/tp_overhead.py --config tiny --num-prompts 4 --input-len 16 \\
        --output-len 4 --short 2 --long 6 --no-warmup     # CPU smoke run

Both engines live side by side (a fixed KV budget each) and are measured in turns, `--rounds`
times, so drift of the device clock or of other load hits both alike; the medians are
reported. Per variant: batch-1 decode time per output token (the difference of two output
lengths, so prefill cancels out) and offline throughput (`--num-prompts` prompts of
`--input-len` tokens, `--output-len` out). The overheads are (shard_map - plain) / plain.
One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.throughput import CONFIGS, write_config  # noqa: E402

SHARD_MAP_ENV = "JAXMM_ATTENTION_SHARD_MAP"  # read by the runner when it is built


def build(path: str, args, shard_map: bool):
    from jaxmm import LLM

    os.environ[SHARD_MAP_ENV] = "1" if shard_map else "0"
    try:
        return LLM(
            path,
            dtype=args.dtype,
            max_model_len=args.input_len + max(args.output_len, args.long) + 16,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_memory_bytes=args.kv_cache_bytes,
            skip_tokenizer_init=True,
            load_format="dummy",
            attention_backend=args.attention_backend,
            warmup=args.warmup,
        )
    finally:
        os.environ.pop(SHARD_MAP_ENV, None)


def decode_ms_per_token(llm, short: int, long: int) -> float:
    from jaxmm import SamplingParams

    prompt = {"prompt_token_ids": list(range(1, 17))}

    def gen(n: int) -> float:
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompt, sp, use_tqdm=False)
        return time.perf_counter() - t0

    gen(short)
    shorts = [gen(short) for _ in range(3)]
    longs = [gen(long) for _ in range(3)]
    return (float(np.median(longs)) - float(np.median(shorts))) / (long - short) * 1e3


def throughput(llm, prompts: list, output_len: int) -> float:
    from jaxmm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="llama-3.1-8b", help=f"one of {sorted(CONFIGS)}")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--short", type=int, default=32, help="batch-1 decode: shorter output")
    ap.add_argument("--long", type=int, default=160, help="batch-1 decode: longer output")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    # two 8B engines side by side: 2 x (16 GB of weights + 13 GiB of KV, 128 sequences of
    # 784 tokens) fit one H100 with XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
    ap.add_argument("--kv-cache-bytes", type=int, default=13 << 30, help="per engine")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile every bucket first (off: the smoke run, where timings mean nothing)",
    )
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxmm-bench"))
    args = ap.parse_args(argv)

    import jax

    cfg = CONFIGS[args.config]
    path = os.path.join(args.workdir, args.config)
    write_config(cfg, path)
    if args.config == "tiny" and args.dtype == "bfloat16" and jax.default_backend() == "cpu":
        args.dtype = "float32"
    engines = {"shard_map": build(path, args, True), "plain": build(path, args, False)}
    for name, llm in engines.items():  # the switch took: the runner says which path it traced
        assert llm.llm_engine.runner.shard_attention == (name == "shard_map"), name
    rng = np.random.default_rng(0)
    prompts = [
        {"prompt_token_ids": rng.integers(1, cfg["vocab_size"], args.input_len).tolist()}
        for _ in range(args.num_prompts)
    ]
    decode: dict[str, list[float]] = {n: [] for n in engines}
    tput: dict[str, list[float]] = {n: [] for n in engines}
    for llm in engines.values():  # one untimed pass each: first-use costs out of the way
        throughput(llm, prompts[: min(8, len(prompts))], 2)
    for _ in range(args.rounds):
        for name, llm in engines.items():
            decode[name].append(decode_ms_per_token(llm, args.short, args.long))
            tput[name].append(throughput(llm, prompts, args.output_len))
    med = {
        n: {
            "decode_ms_per_token": round(float(np.median(decode[n])), 4),
            "output_tokens_per_s": round(float(np.median(tput[n])), 1),
            "decode_runs_ms": [round(x, 4) for x in decode[n]],
            "throughput_runs": [round(x, 1) for x in tput[n]],
        }
        for n in engines
    }
    sm, plain = med["shard_map"], med["plain"]
    result = {
        "benchmark": "tp_overhead",
        "config": args.config,
        "tensor_parallel_size": 1,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "rounds": args.rounds,
        "variants": med,
        # positive: the shard_map path is slower
        "decode_overhead_pct": round(
            (sm["decode_ms_per_token"] / plain["decode_ms_per_token"] - 1) * 100, 2
        ),
        "throughput_overhead_pct": round(
            (plain["output_tokens_per_s"] / sm["output_tokens_per_s"] - 1) * 100, 2
        ),
        "attention_backend": engines["plain"].llm_engine.runner.backend,
        "dtype": args.dtype,
        "device": str(jax.devices()[0].device_kind),
        "jax_version": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
