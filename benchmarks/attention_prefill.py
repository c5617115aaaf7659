"""Causal prefill attention: jaxmm Pallas kernel (paged) vs cuDNN (dense), JSON lines.

    python benchmarks/attention_prefill.py [--sweep] [--plans JSON]
        [--out benchmarks/results/attention_prefill_h100.json --run-name NAME]

Problem: one sequence of S in {512, 2048, 8192} tokens, bf16, N=32, K=8, H=128, causal.
  jaxmm  paged_attention over a page-16 KV pool holding the sequence (KV already written);
         on an H100 its prefill kernel is the Mosaic GPU one (gpu/prefill_mgpu.py)
  jaxmm_triton  the same with the Triton-lowered prefill kernel (gpu/prefill.py)
  cudnn  jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn"), dense
  jax_mgpu[:BK]  JAX's Mosaic GPU attention (ops/gpu/attention_mgpu.py), dense, KV tile BK
`--plans '[{"prefill_impl": "triton", "prefill_block_q": 64}]'`: more `jaxmm` rows, each
with these `ragged_paged_attention.Plan` fields (recorded under "plan"), in the same run.
Also the cost of the KV write (`reference.write_kv`, XLA scatter into donated pages) for
T = 64 decode tokens and for an 8192-token prefill.

TFLOP/s counts the causal half: 2 * S^2 * N * H (QK^T and PV, 2 flops per MAC, half masked).
Timing as in attention_decode.py (chained calls, dispatched back to back; median of samples).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from benchmarks.attention_decode import DTYPE, G, H, K, N, env_info, time_chain  # noqa: E402
from benchmarks.results_io import RunWriter  # noqa: E402
from jaxmm.kernels.gpu.ragged_paged_attention import paged_attention  # noqa: E402
from jaxmm.kernels.reference import write_kv  # noqa: E402


def prefill_rows(S, impls, plan=None, page_size=G, layout="random"):
    """Rows for one S. page_size / layout ("random" permutation or "contiguous" run of the
    pool) set our kernel's KV pool; the published rows are page 16, random."""
    rng = np.random.default_rng(0)
    G = page_size
    P = S // G
    sm_scale = 1.0 / math.sqrt(H)
    key = jax.random.PRNGKey(0)
    kq, kk, kv_ = jax.random.split(key, 3)
    q = jax.random.normal(kq, (S, N, H), DTYPE)
    k = jax.random.normal(kk, (S, K, H), DTYPE)
    v = jax.random.normal(kv_, (S, K, H), DTYPE)
    A = P + 7
    order = rng.permutation(A) if layout == "random" else np.arange(A)
    table = jnp.asarray(order[:P].astype(np.int32))[None]
    kv_lens = jnp.array([S], jnp.int32)
    cu = jnp.array([0, S], jnp.int32)
    ns = jnp.array([1], jnp.int32)
    pages = jnp.zeros((2, K, A, G, H), DTYPE)
    pages = write_kv(k, v, pages, kv_lens, table, cu, ns)
    flops = 2.0 * S * S * N * H
    n = 2
    rows = []
    for impl in impls:
        try:
            if impl in ("jaxmm", "jaxmm_triton"):
                data = pages
                p = plan if impl == "jaxmm" else (*(plan or ()), ("prefill_impl", "triton"))

                def step(x, t, pages, p=p):
                    return paged_attention(x, pages, kv_lens, t, cu, ns, sm_scale=sm_scale, plan=p)

            elif impl == "cudnn":
                data = (k, v)

                def step(x, t, kv):
                    o = jax.nn.dot_product_attention(
                        x[None],
                        kv[0][None],
                        kv[1][None],
                        scale=sm_scale,
                        is_causal=True,
                        implementation="cudnn",
                    )
                    return o[0]

            elif impl.startswith("jax_mgpu"):
                # JAX's Mosaic GPU flash attention (Hopper: TMA, wgmma, warp specialised),
                # dense (B, S, N, H); `jax_mgpu:<block_kv>` picks its KV tile (default 128).
                from jax.experimental.pallas.ops.gpu import attention_mgpu as am

                block_kv = int(impl.split(":")[1]) if ":" in impl else 128
                cfg = am.TuningConfig(
                    block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True
                )
                # float16 only (its shared-memory tiles are f16; same speed as bf16)
                data = (k.astype(jnp.float16), v.astype(jnp.float16))

                def step(x, t, kv, cfg=cfg):
                    # it takes no softmax scale: the query comes pre-scaled
                    x = x.astype(jnp.float16)
                    return am.attention(x[None], kv[0][None], kv[1][None], cfg)[0]

            else:
                raise ValueError(impl)
            t, spread = time_chain(step, q, [table], data, n, est_s=flops / 4e14)
            row = dict(
                bench="prefill",
                impl=impl,
                S=S,
                ms=round(t * 1e3, 4),
                tflops=round(flops / t / 1e12, 1),
                spread=round(spread, 3),
                n=n,
            )
            if plan:
                row["plan"] = dict(plan)
            if impl.startswith("jaxmm") and (G, layout) != (16, "random"):
                row.update(page_size=G, pages=layout)
        except Exception as e:
            row = dict(bench="prefill", impl=impl, S=S, error=f"{type(e).__name__}: {str(e)[:300]}")
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def write_rows():
    """This step's K/V into the pages, donated: reference scatter, our scatter, Pallas copy."""
    from jaxmm.kernels import kv_write

    impls = {
        "reference_scatter": write_kv,
        "xla_scatter": kv_write.write_kv_xla,
        "pallas": kv_write.write_kv_pallas,
    }
    rows = []
    for T, A in [(64, 64 * 128), (256, 256 * 128), (8192, 8192 // G + 7)]:
        key = jax.random.PRNGKey(1)
        k = jax.random.normal(key, (T, K, H), DTYPE)
        if T <= 256:  # T decodes, one token each, at the end of 2048-token contexts
            kv_lens = jnp.full((T,), 2048, jnp.int32)
            table = jnp.arange(T * 128, dtype=jnp.int32).reshape(T, 128)
            cu = jnp.arange(T + 1, dtype=jnp.int32)
        else:
            kv_lens = jnp.array([T], jnp.int32)
            table = jnp.arange(T // G, dtype=jnp.int32)[None]
            cu = jnp.array([0, T], jnp.int32)
        ns = jnp.array([kv_lens.shape[0]], jnp.int32)
        n = 20
        for name, fn in impls.items():
            pages = jnp.zeros((2, K, A, G, H), DTYPE)

            def run(pages, k, fn=fn, kv_lens=kv_lens, table=table, cu=cu, ns=ns, n=n):
                for _ in range(n):
                    pages = fn(k, k, pages, kv_lens, table, cu, ns)
                return pages

            try:
                f = jax.jit(run, donate_argnums=0)
                pages = jax.block_until_ready(f(pages, k))
                pages = jax.block_until_ready(f(pages, k))
                ts = []
                for _ in range(7):
                    t0 = time.perf_counter()
                    pages = jax.block_until_ready(f(pages, k))
                    ts.append((time.perf_counter() - t0) / n)
                row = dict(
                    bench="kv_write", impl=name, T=T, us=round(statistics.median(ts) * 1e6, 2)
                )
            except Exception as e:
                row = dict(
                    bench="kv_write", impl=name, T=T, error=f"{type(e).__name__}: {str(e)[:300]}"
                )
            print(json.dumps(row), flush=True)
            rows.append(row)
            del pages
    return rows


def sweep():
    rows = []
    variants = [
        (128, 64, 8, 2),
        (128, 64, 8, 3),
        (128, 128, 8, 2),
        (128, 32, 4, 2),
        (64, 64, 4, 2),
        (64, 64, 4, 3),
        (64, 128, 4, 2),
        (128, 64, 4, 3),
    ]
    d = jax.devices()[0]
    cores = getattr(d, "core_count", 132)
    for S in (2048, 8192):
        for gather in ("page", "token"):
            for bq, bk, w, st in variants:
                plan = (
                    ("prefill_block_q", bq),
                    ("prefill_block_k", bk),
                    ("prefill_warps", w),
                    ("prefill_stages", st),
                    ("gather", gather),
                )
                rows += prefill_rows(S, ["jaxmm"], plan=plan)
        for mult in (1, 4):
            rows += prefill_rows(S, ["jaxmm"], plan=(("prefill_programs", mult * cores),))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--impls", default="jaxmm,cudnn")
    ap.add_argument("--seq", default="512,2048,8192")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--write-only", action="store_true")
    ap.add_argument("--out", default=None, help="results file to append this run to")
    ap.add_argument("--run-name", default="run", help="the run's variant name in --out")
    ap.add_argument("--page-size", type=int, default=G, help="our KV pool's page size")
    ap.add_argument("--pages", choices=("random", "contiguous"), default="random")
    ap.add_argument("--plans", default=None, help="JSON list of Plan overrides for more rows")
    a = ap.parse_args(argv)
    info = env_info()
    print(json.dumps(dict(bench="env", **info)), flush=True)
    rows = []
    if a.write_only:
        rows += write_rows()
    elif a.sweep:
        rows += sweep()
    else:
        plans = json.loads(a.plans) if a.plans else []
        for S in map(int, a.seq.split(",")):
            rows += prefill_rows(S, a.impls.split(","), page_size=a.page_size, layout=a.pages)
            for plan in plans:
                rows += prefill_rows(
                    S, ["jaxmm"], plan=tuple(plan.items()), page_size=a.page_size, layout=a.pages
                )
        if not a.no_write:
            rows += write_rows()
    if a.out:
        RunWriter(
            a.out,
            benchmark="attention_prefill",
            script="benchmarks/attention_prefill.py",
            variant=a.run_name,
            env=info,
        ).write(rows=rows)
    return rows


if __name__ == "__main__":
    main()
