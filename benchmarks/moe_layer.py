"""MoE layer micro-benchmark: every grouped-matmul implementation of layers/moe.py side by side.

    python benchmarks/moe_layer.py                      # Qwen3-30B-A3B shape, bf16
    python benchmarks/moe_layer.py --tokens 1 16 --impls ragged gather
    python benchmarks/moe_layer.py --smoke              # tiny float32 shape (tests)

Shape (default): E=128 experts, top-8, D=2048, F=768 (Qwen3-30B-A3B), router with random
N(0, 0.02) weights (near-uniform routing, as a trained router on varied text), tokens
T in {1, 16, 64, 512, 4096}. Each row times one jitted call of router + top-k + experts on
(T, D) inputs: best of `--reps` rounds of 10 back-to-back calls.

Columns: `ms`; `touched_GBps`: bytes of the expert weights this routing touches (distinct
experts chosen x 3 D F x dtype bytes) over the time, to set beside the measured copy
bandwidth (a decode-sized T is bandwidth-bound: the ideal is touched bytes / copy
bandwidth); `TFLOPs`: useful FLOPs (2 T k 3 D F, no padding, no unchosen experts) over the
time, beside the measured dense bf16 matmul rate. `default` marks what `auto` runs.
`max_abs_err` is the largest difference from `dense` (the oracle) on the same inputs.
Implementations whose temporaries would not fit (`gather` materialises T k expert
matrices) are skipped with the reason.

`pallas` is ours (kernels/grouped_matmul.py, Triton lowering, its default blocks); on a GPU
it also runs with the variants `pallas:BM,BN,BK,WARPS` of PALLAS_BLOCKS, to pick its
defaults from. Off a GPU it only runs interpreted, so it is skipped there except at the
--smoke shape (a correctness check, not a timing).

`mosaic_gpu` (layers/moe.py: the Pallas Mosaic GPU grouped GEMM JAX ships) runs where
`mosaic_gpu_supported` says (a Hopper GPU), skipped with the reason elsewhere.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    "qwen3-30b-a3b": dict(E=128, k=8, D=2048, F=768, dtype="bfloat16"),
    "smoke": dict(E=8, k=2, D=32, F=16, dtype="float32"),
}
TEMP_LIMIT_BYTES = 16 << 30  # skip an implementation whose largest temporary exceeds this
# (block_m, block_n, block_k, num_warps) variants of `pallas` timed on a GPU beside its
# defaults: small tiles for decode (more programs over the SMs), large ones for prefill
PALLAS_BLOCKS = [
    (16, 32, 128, 4),
    (16, 64, 64, 4),
    (16, 128, 128, 4),
    (32, 128, 64, 4),
    (64, 128, 64, 4),
    (128, 128, 64, 4),
    (128, 128, 64, 8),
]


def _pallas_blocks(impl: str) -> dict | None:
    """`pallas:BM,BN,BK[,WARPS]` -> the kernel's arguments; plain `pallas` -> None (its
    defaults)."""
    if impl == "pallas":
        return None
    values = [int(v) for v in impl.split(":", 1)[1].split(",")]
    names = ("block_m", "block_n", "block_k", "num_warps")
    return dict(zip(names, values, strict=False))


def _temp_bytes(impl: str, T: int, E: int, k: int, D: int, F: int, nbytes: int) -> int:
    """The largest temporary of one implementation (what decides whether it fits)."""
    if impl == "gather":
        return T * k * D * F * nbytes  # gathered expert matrices
    if impl == "dense":
        return T * E * max(D, F) * 4  # every expert's output, float32 for the combine
    return T * k * max(D, F) * 4


def _time(fn, *args, reps: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(10):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / 10)
    return best


def bench(
    shape: dict, tokens: list[int], impls: list[str], reps: int, interpret_ok: bool = False
) -> list[dict]:
    """interpret_ok: run `pallas` off a GPU too (interpreted: a check, not a timing)."""
    import jax
    import jax.numpy as jnp

    from jaxmm.layers import moe

    E, k, D, F = shape["E"], shape["k"], shape["D"], shape["F"]
    dtype = jnp.dtype(shape["dtype"])
    keys = jax.random.split(jax.random.key(0), 5)
    std = 0.02
    gate = (jax.random.normal(keys[0], (E, D, F), jnp.float32) * std).astype(dtype)
    up = (jax.random.normal(keys[1], (E, D, F), jnp.float32) * std).astype(dtype)
    down = (jax.random.normal(keys[2], (E, F, D), jnp.float32) * std).astype(dtype)
    router = (jax.random.normal(keys[3], (D, E), jnp.float32) * std).astype(dtype)

    def layer(x, router, gate, up, down, impl):
        weights, ids = moe.route(x @ router, k, True)
        if impl.startswith("pallas"):
            blocks = _pallas_blocks(impl)
            return moe.experts_pallas(x, weights, ids, gate, up, down, jax.nn.silu, blocks)
        return moe.experts_forward(x, weights, ids, gate, up, down, jax.nn.silu, impl)

    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and "pallas" in impls:
        impls = [*impls, *("pallas:" + ",".join(map(str, b)) for b in PALLAS_BLOCKS)]
    mosaic = moe.mosaic_gpu_supported(D, F, dtype)

    rows = []
    for T in tokens:
        x = jax.random.normal(jax.random.fold_in(keys[4], T), (T, D), jnp.float32).astype(dtype)
        _, ids = moe.route(x @ router, k, True)
        touched = len(np.unique(np.asarray(ids))) * 3 * D * F * dtype.itemsize
        flops = 2 * T * k * 3 * D * F
        default = moe.default_impl(T, k, E)
        ref = None
        if _temp_bytes("dense", T, E, k, D, F, dtype.itemsize) <= TEMP_LIMIT_BYTES:
            ref = np.asarray(jax.jit(layer, static_argnums=5)(x, router, gate, up, down, "dense"))
        for impl in impls:
            row = dict(T=T, impl=impl, default=impl == default, touched_expert_bytes=touched)
            need = _temp_bytes(impl, T, E, k, D, F, dtype.itemsize)
            if impl.startswith("pallas") and not (on_gpu or interpret_ok):
                row["skipped"] = "Pallas GPU kernel off a GPU runs interpreted (not a timing)"
                rows.append(row)
                continue
            if impl == "mosaic_gpu" and not mosaic:
                row["skipped"] = "needs a Hopper GPU, 16-bit weights, D and F multiples of 128"
                rows.append(row)
                continue
            if need > TEMP_LIMIT_BYTES:
                row["skipped"] = f"temporary of {need / 2**30:.1f} GiB"
                rows.append(row)
                continue
            fn = jax.jit(layer, static_argnums=5)
            try:
                out = np.asarray(fn(x, router, gate, up, down, impl))
                s = _time(fn, x, router, gate, up, down, impl, reps=reps)
            except Exception as e:  # a candidate kernel that does not run here
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                continue
            if ref is not None:
                diff = np.abs(out.astype(np.float32) - ref.astype(np.float32))
                row["max_abs_err"] = float(diff.max())
            row.update(
                ms=round(s * 1e3, 4),
                touched_GBps=round(touched / s / 1e9, 3),
                TFLOPs=round(flops / s / 1e12, 4),
            )
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    from jaxmm.layers.moe import IMPLEMENTATIONS, KERNEL_IMPLEMENTATIONS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 512, 4096])
    p.add_argument("--impls", nargs="+", default=[*IMPLEMENTATIONS, *KERNEL_IMPLEMENTATIONS])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny float32 shape, T in {1, 16}")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.tokens, args.reps = "smoke", [1, 16], 1

    import jax

    from benchmarks.throughput import device_rates

    flops, bw = device_rates(reps=1 if args.smoke else 5)
    shape = SHAPES[args.shape]
    result = {
        "benchmark": "moe_layer",
        "shape": dict(name=args.shape, **shape),
        "device": str(jax.devices()[0].device_kind),
        "jax_version": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "copy_bandwidth_GBps": round(bw / 1e9, 1),
        "matmul_TFLOPs": round(flops / 1e12, 1),
        "rows": bench(shape, args.tokens, args.impls, args.reps, interpret_ok=args.smoke),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
