"""End-to-end batch-1 decode vs the weight-streaming roofline (Llama-3.1-8B shape, random bf16).

    python benchmarks/e2e_decode.py [--config llama-3.1-8b] [--attention-backend auto]

Roofline: every decode step must read all weights once, so a token costs at least
weight_bytes / copy_bandwidth, with the bandwidth measured on this device by a large
read+write. Reports the engine's time per output token (LLM.generate, from the difference
of two output lengths so prefill cancels out) and the bare jitted step (runner only), both
as multiples of the roofline. One JSON line.
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


def copy_bandwidth(nbytes: int = 4 << 30, iters: int = 20) -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 2)
    f(x).block_until_ready()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / float(np.median(times))  # read + write


def decode_tpot_ms(llm, short: int, long: int, warm_long: bool = True) -> float:
    """Milliseconds per output token of one 16-token text request, batch 1: the difference
    of the median times of two output lengths (prefill cancels out), after untimed runs."""
    from jaxmm import SamplingParams

    prompt = {"prompt_token_ids": list(range(1, 17))}

    def gen(n):
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompt, sp, use_tqdm=False)
        return time.perf_counter() - t0

    gen(short)
    if warm_long:  # every decode bucket and page count compiled before timing
        gen(long)
    shorts = [gen(short) for _ in range(3)]
    longs = [gen(long) for _ in range(3)]
    return float(np.median(longs) - np.median(shorts)) / (long - short) * 1e3


def device_step_time_ms(runner, step, n: int) -> float:
    """Milliseconds per jitted step of `step` on the device alone: `n` steps launched back
    to back without waiting, so host work overlaps; the caches they return are kept."""
    import jax

    arrays, _ = runner.prepare([step])
    caches = runner.kv_caches
    jax.block_until_ready(caches)
    t0 = time.perf_counter()
    for _ in range(n):
        caches, (logits, _) = runner._step(
            runner._param_leaves, caches, runner._no_prev, *arrays, runner.encoder_cache
        )
    jax.block_until_ready(logits)
    ms = (time.perf_counter() - t0) / n * 1e3
    runner.kv_caches = caches
    return ms


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="llama-3.1-8b")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--short", type=int, default=32)
    ap.add_argument("--long", type=int, default=160)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxmm-bench"))
    args = ap.parse_args(argv)

    import jax

    from jaxmm import LLM
    from jaxmm.runner.model_runner import SeqStep

    cfg = CONFIGS[args.config]
    path = os.path.join(args.workdir, args.config)
    write_config(cfg, path)
    llm = LLM(
        path,
        dtype="bfloat16",
        max_model_len=1024,
        max_num_seqs=16,
        max_num_batched_tokens=32,  # two buckets: quick to warm up
        skip_tokenizer_init=True,
        load_format="dummy",
        attention_backend=args.attention_backend,
        warmup=True,
    )
    runner = llm.llm_engine.runner
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(runner.params))
    bw = copy_bandwidth()
    roofline_ms = weight_bytes / bw * 1e3

    def tpot(async_scheduling: bool) -> float:
        llm.llm_engine.async_scheduling = async_scheduling
        return decode_tpot_ms(llm, args.short, args.long, warm_long=False)

    sync_tpot_ms = tpot(False)
    tpot_ms = tpot(True)

    # bare step: one decode token of a 100-token context, step + sampler, synchronised
    step = SeqStep(token_ids=[5], start=99, block_table=list(range(7)), sample=True)
    for _ in range(3):
        runner.execute([step])
    ts = []
    for _ in range(50):
        t0 = time.perf_counter()
        runner.execute([step])
        ts.append(time.perf_counter() - t0)
    step_ms = float(np.median(ts)) * 1e3

    device_step_ms = device_step_time_ms(runner, step, 50)

    result = {
        "benchmark": "e2e_decode_batch1",
        "config": args.config,
        "weight_bytes": int(weight_bytes),
        "copy_bandwidth_GBps": round(bw / 1e9, 1),
        "roofline_ms_per_token": round(roofline_ms, 3),
        "engine_ms_per_token": round(float(tpot_ms), 3),
        "engine_vs_roofline": round(float(tpot_ms) / roofline_ms, 3),
        "engine_sync_ms_per_token": round(float(sync_tpot_ms), 3),
        "engine_sync_vs_roofline": round(float(sync_tpot_ms) / roofline_ms, 3),
        "init_times_s": runner.init_times,
        "runner_step_ms": round(step_ms, 3),
        "runner_step_vs_roofline": round(step_ms / roofline_ms, 3),
        "device_step_ms": round(device_step_ms, 3),
        "device_step_vs_roofline": round(device_step_ms / roofline_ms, 3),
        "attention_backend": runner.backend,
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
