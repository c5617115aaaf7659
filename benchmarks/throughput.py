"""Offline throughput on a random-weight model of a given HF config shape (no download).

    python benchmarks/throughput.py --config llama-3.1-8b --num-prompts 256 \
        --input-len 512 --output-len 128
    python benchmarks/throughput.py --config tiny --num-prompts 8 --input-len 32 --output-len 16

Writes only the config (under --workdir); weights are random, made on device; runs
`LLM.generate` over random token prompts with ignore_eos, prints one JSON line.

--step-log FILE records every step of the timed run (its bucket, sequences, prefill and
decode tokens, summed context, and when its tokens reached the host) and adds a summary by
kind of step to the JSON: pure-decode steps vs steps that carry prefill chunks, each with
its time and the time its own FLOPs / bytes bound it to (see `step_bound_s`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = {
    "llama-3.1-8b": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ),
    "tiny": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        torch_dtype="float32",
    ),
}


def write_config(cfg: dict, path: str) -> None:
    """Only config.json: weights are made on device (load_format="dummy")."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def physical_bound_s(
    cfg: dict,
    num_prompts: int,
    input_len: int,
    output_len: int,
    batch: int,
    matmul_flops: float,
    copy_bw: float,
    dtype_bytes: int,
) -> float:
    """Lower bound on the workload's time on this device.

    Prefill: 2 * params * tokens (+ causal attention) FLOPs at the measured matmul rate.
    Decode: for each step, max(weights + the batch's KV bytes over the copy bandwidth,
    2 * params * batch FLOPs over the matmul rate); steps = output_len * waves of `batch`.
    """
    D, F, L, V = (
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["num_hidden_layers"],
        cfg["vocab_size"],
    )
    N, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    H = D // N
    params = L * (D * (N + 2 * K) * H + N * H * D + 3 * D * F) + 2 * V * D
    prefill_flops = 2 * params * num_prompts * input_len
    prefill_flops += num_prompts * L * 2 * N * H * input_len * input_len  # causal QK^T + PV
    t = prefill_flops / matmul_flops
    waves = -(-num_prompts // batch)
    for step in range(output_len):
        ctx = input_len + step
        kv_bytes = batch * L * 2 * K * H * ctx * dtype_bytes
        t_bytes = (params * dtype_bytes + kv_bytes) / copy_bw
        t_flops = (2 * params * batch + batch * L * 4 * N * H * ctx) / matmul_flops
        t += waves * max(t_bytes, t_flops)
    return t


def step_bound_s(cfg: dict, rec: dict, flops: float, bw: float, dtype_bytes: int) -> float:
    """One step's floor: max(FLOPs / matmul rate, (weights + KV read) / copy bandwidth).
    FLOPs: 2 * non-embedding params per token, the LM head per sampled row, attention
    4 * N * H * context per new token per layer (causal prefill: half)."""
    D, F, L, V = (
        cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    )
    N, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    H = D // N
    body = L * (D * (N + 2 * K) * H + N * H * D + 3 * D * F)
    f = 2 * body * rec["tokens"] + 2 * V * D * rec["seqs"] + L * 4 * N * H * rec["attn_ctx"]
    kv = L * 2 * K * H * rec["ctx"] * dtype_bytes
    return max(f / flops, ((body + V * D) * dtype_bytes + kv) / bw)


class StepLog:
    """Wraps the runner's dispatch/resolve to time each step of an asynchronous engine: a
    step's time is the gap between its tokens reaching the host and the previous step's."""

    def __init__(self, runner):
        self.records: list[dict] = []
        self._dispatch, self._resolve = runner.dispatch, runner.resolve
        runner.dispatch, runner.resolve = self.dispatch, self.resolve
        self.runner = runner

    def dispatch(self, steps, prev=None):
        decode = sum(1 for s in steps if len(s.token_ids) == 1 and s.start > 0)
        tokens = sum(len(s.token_ids) for s in steps)
        rec = dict(
            T=self.runner.bucket(max(tokens, len(steps)))[0],
            seqs=len(steps),
            decode=decode,
            tokens=tokens,
            prefill_tokens=tokens - decode,
            ctx=sum(s.start + len(s.token_ids) for s in steps),
            # new tokens x their average context (causal within a chunk)
            attn_ctx=sum(len(s.token_ids) * (s.start + (len(s.token_ids) + 1) / 2) for s in steps),
        )
        handle = self._dispatch(steps, prev)
        handle._log = rec
        return handle

    def resolve(self, inflight):
        out = self._resolve(inflight)
        rec = getattr(inflight, "_log", None)
        if rec is not None:
            rec["done"] = time.perf_counter()
            self.records.append(rec)
        return out

    def summary(self, cfg, t0: float, flops: float, bw: float, dtype_bytes: int) -> dict:
        prev = t0
        kinds: dict[str, dict] = {}
        for r in self.records:
            r["time_s"] = r["done"] - prev
            prev = r["done"]
            r["bound_s"] = step_bound_s(cfg, r, flops, bw, dtype_bytes)
            kind = "decode" if r["prefill_tokens"] == 0 else "with_prefill"
            k = kinds.setdefault(kind, dict(steps=0, time_s=0.0, bound_s=0.0, tokens=0))
            k["steps"] += 1
            k["time_s"] += r["time_s"]
            k["bound_s"] += r["bound_s"]
            k["tokens"] += r["tokens"]
        for k in kinds.values():
            k["fraction_of_bound"] = round(k["bound_s"] / k["time_s"], 3) if k["time_s"] else None
            k["time_s"], k["bound_s"] = round(k["time_s"], 3), round(k["bound_s"], 3)
        return kinds


def device_rates(reps: int = 5) -> tuple[float, float]:
    """Measured bf16 matmul FLOP/s and copy bandwidth (read + write bytes/s): the best of
    `reps` timings of 10 back-to-back runs each, on random data (constant inputs such as
    ones make the matrix units run faster than real data, which would understate the bound)."""
    import jax
    import jax.numpy as jnp

    def timed(f, *args, iters=10):
        jax.block_until_ready(f(*args))
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(iters):
                out = f(*args)
            jax.block_until_ready(out)
            best = min(best, (time.perf_counter() - t0) / iters)
        return best

    key = jax.random.PRNGKey(0)
    n = 8192 if jax.default_backend() != "cpu" else 512
    a = jax.random.normal(key, (n, n), jnp.bfloat16)
    flops = 2 * n**3 / timed(jax.jit(lambda x: x @ x), a)
    m = (1 << 30) if jax.default_backend() != "cpu" else (1 << 24)
    x = jax.random.normal(key, (m,), jnp.bfloat16)
    bw = 2 * x.nbytes / timed(jax.jit(lambda x: x * 2), x)
    return flops, bw


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="tiny", help=f"one of {sorted(CONFIGS)} or a config.json")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--bound", action="store_true", help="also compute the physical bound")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxmm-bench"))
    ap.add_argument("--step-log", help="write each step of the timed run here (JSON lines)")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    import jax

    from jaxmm import LLM, SamplingParams
    from jaxmm.runner.model_runner import backend_compile_count

    if args.config in CONFIGS:
        cfg, name = CONFIGS[args.config], args.config
    else:
        with open(args.config) as f:
            cfg, name = json.load(f), os.path.basename(args.config)
    path = os.path.join(args.workdir, name)
    write_config(cfg, path)
    max_len = args.input_len + args.output_len
    compiles0 = backend_compile_count()
    llm = LLM(
        path,
        dtype=args.dtype,
        max_model_len=max(max_len, 32),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        skip_tokenizer_init=True,
        attention_backend=args.attention_backend,
        load_format="dummy",
        warmup=True,
        async_scheduling=args.async_scheduling,
    )
    rng = np.random.default_rng(0)
    V = cfg["vocab_size"]
    first = llm.generate(
        {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=1), use_tqdm=False
    )
    assert first[0].outputs[0].token_ids
    init_to_first_token = time.perf_counter() - t_start
    warmup_compiles = backend_compile_count() - compiles0
    prompts = [
        {"prompt_token_ids": rng.integers(0, V, args.input_len).tolist()}
        for _ in range(args.num_prompts)
    ]
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    compiles1 = backend_compile_count()
    log = StepLog(llm.llm_engine.runner) if args.step_log else None
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    runner = llm.llm_engine.runner
    result = {
        "benchmark": "throughput",
        "config": name,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "elapsed_s": round(elapsed, 3),
        "output_tokens_per_s": round(out_tokens / elapsed, 2),
        "total_tokens_per_s": round((out_tokens + args.num_prompts * args.input_len) / elapsed, 2),
        "requests_per_s": round(args.num_prompts / elapsed, 3),
        "init_to_first_token_s": round(init_to_first_token, 2),
        "init_times_s": llm.llm_engine.runner.init_times,
        "async_scheduling": args.async_scheduling,
        "compilation_cache": os.environ.get("JAXMM_CACHE_DIR"),
        "warmup_compiles": warmup_compiles,
        "compiles_during_run": backend_compile_count() - compiles1,
        "token_buckets": runner.token_buckets,
        "attention_backend": runner.backend,
        "dtype": np.dtype(runner.dtype).name,
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
    }
    if args.bound or log is not None:
        flops, bw = device_rates()
    if log is not None:
        result["steps"] = log.summary(cfg, t0, flops, bw, np.dtype(runner.dtype).itemsize)
        with open(args.step_log, "w") as f:
            for r in log.records:
                f.write(json.dumps(r) + "\n")
    if args.bound:
        batch = min(args.num_prompts, runner.max_num_seqs)
        bound = physical_bound_s(
            cfg,
            args.num_prompts,
            args.input_len,
            args.output_len,
            batch,
            flops,
            bw,
            np.dtype(runner.dtype).itemsize,
        )
        result.update(
            matmul_tflops=round(flops / 1e12, 1),
            copy_bandwidth_GBps=round(bw / 1e9, 1),
            bound_s=round(bound, 3),
            fraction_of_bound=round(bound / elapsed, 3),
        )
    print(json.dumps(result))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
