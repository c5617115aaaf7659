"""The sampler's cost next to a decode step: the sampler program alone, then single-stream
decode of the embedded SmolLM2-135M with and without top-k / top-p.

    python benchmarks/sampler.py [--rows 1 16] [--vocab 49152] [--output-len 32] [--no-step]

Sampler rows: median ms per call of `jaxmm.layers.sampler.sample` on (S, V) float32 logits,
for each variant, beside a full sort of the same logits (what a sort-based top-k/top-p
pays). "peaked" logits are N(0, 4^2), where a few tokens hold the mass (the candidates'
path); "flat" ones N(0, 0.3^2), where top-p needs more than the candidates (the bisection
path). Step rows: decode tokens/s of one stream (temperature 0.8, seed 0, EOS ignored)
after one warm-up round of the same request. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {
    # name: (all_greedy, use_filters, per-row fields, logits scale)
    "greedy": (True, False, {}, 4.0),
    "temperature": (False, False, {}, 4.0),
    "top_k=40": (False, True, {"top_k": 40}, 4.0),
    "top_p=0.9": (False, True, {"top_p": 0.9}, 4.0),
    "top_k=40,top_p=0.95,min_p=0.05": (
        False,
        True,
        {"top_k": 40, "top_p": 0.95, "min_p": 0.05},
        4.0,
    ),
    "top_p=0.9 flat": (False, True, {"top_p": 0.9}, 0.3),
    "top_k=1000 flat": (False, True, {"top_k": 1000}, 0.3),
}


def _median_ms(fn, *args, reps: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


def _tensors(S: int, fields: dict):
    import jax.numpy as jnp
    import numpy as np

    from jaxmm.layers.sampler import SamplingTensors

    def col(name, dtype, default):
        return jnp.asarray(np.full(S, fields.get(name, default), dtype))

    return SamplingTensors(
        temperature=col("temperature", np.float32, 0.8),
        top_k=col("top_k", np.int32, 0),
        top_p=col("top_p", np.float32, 1.0),
        min_p=col("min_p", np.float32, 0.0),
        seeds=jnp.arange(S, dtype=jnp.uint32),
        steps=col("steps", np.int32, 0),
        presence=col("presence", np.float32, 0.0),
        frequency=col("frequency", np.float32, 0.0),
        repetition=col("repetition", np.float32, 1.0),
        seen_tokens=jnp.full((S, 1), -1, jnp.int32),
        seen_is_output=jnp.zeros((S, 1), bool),
        banned=jnp.full((S, 1), -1, jnp.int32),
    )


def bench_sampler(rows: list[int], vocab: int, reps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxmm.layers.sampler import sample

    fn = jax.jit(
        sample, static_argnames=("all_greedy", "use_filters", "use_penalties", "num_logprobs")
    )
    sort = jax.jit(lambda x: jnp.sort(x, axis=-1))
    out = []
    for S in rows:
        rng = np.random.default_rng(0)
        base = rng.standard_normal((S, vocab)).astype(np.float32)
        row = {"rows": S, "vocab": vocab, "full_sort_ms": _median_ms(sort, base * 4, reps=reps)}
        for name, (greedy, filters, fields, scale) in VARIANTS.items():
            logits = jnp.asarray(base * scale)
            t = _tensors(S, fields)

            def call(x, t, greedy=greedy, filters=filters):
                return fn(
                    x,
                    t,
                    all_greedy=greedy,
                    use_filters=filters,
                    use_penalties=False,
                    num_logprobs=0,
                )

            row[f"{name}_ms"] = _median_ms(call, logits, t, reps=reps)
        out.append(row)
    return out


def bench_step(model: str | None, output_len: int) -> dict:
    from jaxmm import LLM, SamplingParams
    from jaxmm.default_model import default_model_path

    llm = LLM(
        model or default_model_path(),
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=64,
        max_num_seqs=16,
    )
    ids = llm.get_tokenizer()("Once upon a time, in a small village,").input_ids
    result = {}
    for name, kw in {
        "temperature": {},
        "top_k=40": {"top_k": 40},
        "top_p=0.95": {"top_p": 0.95},
        "top_k=40,top_p=0.95": {"top_k": 40, "top_p": 0.95},
    }.items():
        sp = SamplingParams(temperature=0.8, seed=0, max_tokens=output_len, ignore_eos=True, **kw)
        llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)  # compiles
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        result[f"{name}_tok_s"] = round(len(out[0].outputs[0].token_ids) / dt, 2)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--vocab", type=int, default=49152, help="(default: SmolLM2's)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--model", help="checkpoint for the step rows (default: embedded)")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--no-step", action="store_true", help="the sampler rows only")
    args = p.parse_args(argv)

    import jax

    result = {
        "benchmark": "sampler",
        "device": str(jax.devices()[0].device_kind),
        "platform": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "sampler": bench_sampler(args.rows, args.vocab, args.reps),
    }
    if not args.no_step:
        result["single_stream_decode"] = bench_step(args.model, args.output_len)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
