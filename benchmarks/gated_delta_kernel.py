"""Gated delta rule kernels: the XLA path against the Pallas decode kernel, on one layer's state.

    python benchmarks/gated_delta_kernel.py                 # Qwen3.5-9B heads, GPU
    python benchmarks/gated_delta_kernel.py --smoke         # tiny shape, CPU interpret mode

Shape (default): N = 32 value heads, Hk = Hv = 128 (Qwen3.5-9B's linear layers; q and k
already repeated to the value heads), a pool of 256 + 1 float32 state slots (2 MiB each),
rows on random distinct slots, all continuing their state.

1. `decode` (batch 1, 16, 64): one step of single-token rows through
   `gated_delta.ragged_gated_delta` with backend "xla" and "pallas" (what the engine runs),
   and the bare decode functions: `decode_reference` (XLA) and the Pallas kernel at each
   `--block-v`. The pool is donated and fed back each call, as in the engine's step, so the
   kernel's in-place update is what gets timed. `roofline_us`: the state bytes one step must
   move (read + write every row's state once) over the copy bandwidth measured here.
2. `prefill`: one `--prefill-len`-token row (64-token WY chunks, state carried in) through
   both backends of `ragged_gated_delta` (the "pallas" backend runs the chunk-to-chunk
   state hand-off in the Pallas chunk kernel instead of XLA's loop of matmuls).

Times are the best of `--reps` rounds of 10 back-to-back calls, in microseconds.
`max_abs_diff`: the largest difference between the two backends' outputs and states on the
same inputs, checked before timing. Prints one JSON object.
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
    "qwen3.5-9b": dict(N=32, Hk=128, Hv=128, slots=256),
    "smoke": dict(N=2, Hk=16, Hv=16, slots=8),
}


def _time(fn, args, pool_at: int, reps: int) -> float:
    """Best seconds per call; the pool (argument `pool_at`, donated) is fed back each call."""
    import jax

    args = list(args)

    def call():
        out, pool = fn(*args)
        args[pool_at] = pool
        return out

    jax.block_until_ready(call())  # compile
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(10):
            out = call()
        jax.block_until_ready((out, args[pool_at]))
        best = min(best, (time.perf_counter() - t0) / 10)
    return best


def _inputs(rs, T: int, N: int, Hk: int, Hv: int):
    import jax.numpy as jnp

    from jaxmm.kernels.gated_delta import l2norm

    q = l2norm(jnp.asarray(rs.randn(T, N, Hk), jnp.float32)) * Hk**-0.5
    k = l2norm(jnp.asarray(rs.randn(T, N, Hk), jnp.float32))
    v = jnp.asarray(rs.randn(T, N, Hv), jnp.float32)
    g = jnp.asarray(-np.abs(rs.randn(T, N)) * 0.1, jnp.float32)
    beta = jnp.asarray(1 / (1 + np.exp(-rs.randn(T, N))), jnp.float32)
    return q, k, v, g, beta


def _pool(rs, slots: int, N: int, Hk: int, Hv: int):
    import jax.numpy as jnp

    return jnp.asarray(rs.randn(slots + 1, N, Hk, Hv).astype(np.float32) * 0.1)


def _diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def _both_backends(ragged: dict, rs, qkv: tuple, pool: tuple, rest: tuple, reps: int) -> dict:
    """The same inputs through both backends first (a fresh pool of shape `pool` each, drawn
    alike: it is donated), their largest difference, then each backend's time in µs."""
    seed = rs.get_state()
    outs = {}
    for b, f in ragged.items():
        rs.set_state(seed)
        outs[b] = f(*qkv, _pool(rs, *pool), *rest)
    row = dict(max_abs_diff=_diff(outs["xla"], outs["pallas"]))
    for b, f in ragged.items():
        row[f"{b}_us"] = round(_time(f, (*qkv, _pool(rs, *pool), *rest), 5, reps) * 1e6, 2)
    return row


def _ragged_fns():
    import functools

    import jax

    from jaxmm.kernels import gated_delta as gd

    return {
        b: jax.jit(functools.partial(gd.ragged_gated_delta, backend=b), donate_argnums=5)
        for b in ("xla", "pallas")
    }


def bench_decode(shape: dict, batches: list[int], block_vs: list[int], reps: int, bw: float):
    import functools

    import jax
    import jax.numpy as jnp

    from jaxmm.kernels import gated_delta_pallas as gp

    N, Hk, Hv, n_slots = shape["N"], shape["Hk"], shape["Hv"], shape["slots"]
    ragged = _ragged_fns()
    ref = jax.jit(gp.decode_reference, donate_argnums=5)
    native = jax.default_backend() == "gpu"
    rows = []
    for B in batches:
        rs = np.random.RandomState(B)
        T = max(16, 1 << (B - 1).bit_length())  # the engine's smallest token bucket is 16
        qkv = _inputs(rs, T, N, Hk, Hv)
        slots = jnp.asarray(rs.permutation(n_slots)[:B], jnp.int32)
        has = jnp.ones(B, bool)
        cu = jnp.arange(B + 1, dtype=jnp.int32)  # tokens past B are padding
        rows_in = tuple(a[:B] for a in qkv)  # the bare decode functions take B rows
        pool = (n_slots, N, Hk, Hv)
        row = dict(batch=B, **_both_backends(ragged, rs, qkv, pool, (slots, cu, has), reps))
        args = (*rows_in, _pool(rs, n_slots, N, Hk, Hv), slots, has)
        row["decode_xla_us"] = round(_time(ref, args, 5, reps) * 1e6, 2)
        for bv in block_vs:
            kern = jax.jit(
                functools.partial(gp.gated_delta_decode_gpu, block_v=bv, interpret=not native),
                donate_argnums=5,
            )
            args = (*rows_in, _pool(rs, n_slots, N, Hk, Hv), slots, has)
            row[f"decode_pallas_bv{bv}_us"] = round(_time(kern, args, 5, reps) * 1e6, 2)
        state_bytes = 2 * B * N * Hk * Hv * 4
        row["roofline_us"] = round(state_bytes / bw * 1e6, 2)
        row["pallas_state_GBps"] = round(state_bytes / (row["pallas_us"] * 1e-6) / 1e9, 1)
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def bench_prefill(shape: dict, L: int, reps: int) -> dict:
    import jax.numpy as jnp

    N, Hk, Hv, n_slots = shape["N"], shape["Hk"], shape["Hv"], shape["slots"]
    ragged = _ragged_fns()
    rs = np.random.RandomState(L)
    qkv = _inputs(rs, L, N, Hk, Hv)
    slots = jnp.asarray([3], jnp.int32)
    has = jnp.ones(1, bool)
    cu = jnp.asarray([0, L], jnp.int32)
    pool = (n_slots, N, Hk, Hv)
    row = dict(tokens=L, **_both_backends(ragged, rs, qkv, pool, (slots, cu, has), reps))
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen3.5-9b", choices=sorted(SHAPES))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--block-v", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--prefill-len", type=int, default=4096)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny shape, batches 1 and 2 (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.batches, args.block_v = "smoke", [1, 2], [16]
        args.prefill_len, args.reps = 40, 1

    import jax

    from benchmarks.throughput import device_rates

    _, bw = device_rates(reps=1 if args.smoke else 5)
    shape = SHAPES[args.shape]
    result = {
        "benchmark": "gated_delta_kernel",
        "shape": dict(name=args.shape, **shape),
        "device": str(jax.devices()[0].device_kind),
        "jax_version": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "copy_bandwidth_GBps": round(bw / 1e9, 1),
        "decode": bench_decode(shape, args.batches, args.block_v, args.reps, bw),
        "prefill": bench_prefill(shape, args.prefill_len, args.reps),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
