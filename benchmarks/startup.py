"""Where start-up time goes: per token bucket, tracing / lowering / compiling the step.

    JAXMM_CACHE_DIR=/tmp/cc python benchmarks/startup.py [--config llama-3.1-8b]

Run it twice with the same persistent cache directory: the first run is cold, the second
shows what a warm cache still costs (tracing and lowering happen in Python on every start,
the cache only skips XLA's compilation). Prints one JSON line.

    JAXMM_CACHE_DIR=/tmp/cc python benchmarks/startup.py --full [--cprofile prof.txt]

--full times what a user waits for instead: `LLM(...)` with its warmup, then the first
generated token (`init_to_first_token_s`, from before `import jax`), with the runner's
per-phase times; --cprofile writes the 60 most expensive calls (cumulative) of that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

t_process = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.throughput import CONFIGS, write_config  # noqa: E402


def build_llm(LLM, args, warmup: bool):
    """The benchmark's engine: the config's shape, random weights, token-id prompts."""
    path = os.path.join(args.workdir, args.config)
    write_config(CONFIGS[args.config], path)
    return LLM(
        path,
        dtype=args.dtype,
        max_model_len=1024,
        max_num_batched_tokens=args.max_num_batched_tokens,
        skip_tokenizer_init=True,
        load_format="dummy",
        warmup=warmup,
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="llama-3.1-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxmm-bench"))
    ap.add_argument("--full", action="store_true", help="LLM(...) with warmup to the first token")
    ap.add_argument("--cprofile", help="with --full: write a cProfile summary here")
    args = ap.parse_args(argv)
    if args.full:
        return full(args)

    t0 = time.perf_counter()
    import jax

    from jaxmm import LLM

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm = build_llm(LLM, args, warmup=False)
    t_llm = time.perf_counter() - t0
    r = llm.llm_engine.runner
    buckets = []
    for T in r.token_buckets:
        arrays, S = r.prepare([], min_tokens=T)
        t0 = time.perf_counter()
        traced = r._step.trace(r._param_leaves, r.kv_caches, r._no_prev, *arrays)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        lowered.compile()
        t3 = time.perf_counter()
        buckets.append(
            dict(T=T, trace=round(t1 - t0, 3), lower=round(t2 - t1, 3), compile=round(t3 - t2, 3))
        )
    result = {
        "benchmark": "startup",
        "config": args.config,
        "cache_dir": os.environ.get("JAXMM_CACHE_DIR"),
        "import_s": round(t_import, 2),
        "llm_init_s": round(t_llm, 2),
        "init_times_s": r.init_times,
        "attention_backend": r.backend,
        "buckets": buckets,
        "total": {k: round(sum(b[k] for b in buckets), 2) for k in ("trace", "lower", "compile")},
        "process_s": round(time.perf_counter() - t_process, 2),
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result), flush=True)
    return result


def full(args) -> dict:
    """LLM(...) as a user builds it (warmup on, tokenizer off: token-id prompts) to one token."""
    prof = None
    if args.cprofile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    import jax

    from jaxmm import LLM, SamplingParams
    from jaxmm.runner.model_runner import backend_compile_count

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    # every bucket compiled before the first request, as serving needs
    llm = build_llm(LLM, args, warmup=True)
    t_llm = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = llm.generate(
        {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=1), use_tqdm=False
    )
    assert out[0].outputs[0].token_ids
    t_first = time.perf_counter() - t0
    if prof is not None:
        import io
        import pstats

        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(60)
        with open(args.cprofile, "w") as f:
            f.write(buf.getvalue())
    r = llm.llm_engine.runner
    result = {
        "benchmark": "startup",
        "mode": "full",
        "config": args.config,
        "cache_dir": os.environ.get("JAXMM_CACHE_DIR"),
        "import_s": round(t_import, 2),
        "llm_init_s": round(t_llm, 2),
        "first_generate_s": round(t_first, 2),
        "init_to_first_token_s": round(time.perf_counter() - t_process, 2),
        "init_times_s": r.init_times,
        "compiles": backend_compile_count(),
        "torch_imported": "torch" in sys.modules,
        "attention_backend": r.backend,
        "token_buckets": r.token_buckets,
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
