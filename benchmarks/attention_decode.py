"""Paged decode attention: jaxmm Pallas kernel vs its peers, one JSON line per measurement.

    python benchmarks/attention_decode.py [--sweep] [--variants JSON] [--profile]
        [--out benchmarks/results/attention_decode_h100.json --run-name NAME]

`--out F` appends this run to the results file F (benchmarks/results_io.py: every earlier
run is kept), named by `--run-name`, and rewrites F after every row.

Problem: bf16, N=32 query heads, K=8 KV heads, H=128, page size G=16, one query token per
sequence, B in {1, 8, 64, 256} x max context L in {512, 2048, 8192}, all lengths = L
("equal") or uniform in [1, L] ("random", seeded).

Peers, each fed its own native layout (built once, outside the timed region):
  jaxmm         jaxmm.kernels.gpu.ragged_paged_attention.paged_attention: the ragged-batch
                path (metadata, work list, both kernels), KV already written
  jaxmm_kernel  just our decode kernel (gpu/decode.py: decode_attention), metadata precomputed
  jax_triton    jax.experimental.pallas.ops.gpu.paged_attention (k, v pages (K, A, G, H))
  cudnn         jax._src.cudnn.fused_attention_stablehlo.paged_attention (blocks (A, G, K, H))
  xla_ref       jaxmm.kernels.reference (gather + einsum in XLA), KV write stubbed out;
                only where B * L <= 8 * 8192 (it materialises (K, B, L, H) in f32)
  ejkernel      ejkernel's Triton ragged_page_attention_v3 (what EasyDeL runs on GPUs;
                cache (A, G, K, 2, H), K and V interleaved), its integrated KV write stubbed
                out as for xla_ref (not in the default --impls: the wheel pins jax~=0.10, so
                it is installed with --no-deps next to its few pure-Python dependencies)

`--variants '[{"split_mode": "balanced"}, {"split_mode": "balanced", "block_k": 128}]'`
adds one more implementation per dict: `jaxmm` with those `gpu.decode.DecodeOptions`
pinned, named e.g. `jaxmm[split_mode=balanced,block_k=128]`, measured in the same run.

Timing (METHOD.md): one jitted function runs `unroll` calls back to back, each call's output
feeding the next call's query (no CSE), each call reading a different page table into a
pool of >= 4x L2 (so no call hits in L2). The jitted function is dispatched `reps` times
asynchronously, chained, and the wall time to the last result is divided by the number of
calls; median of 5 such samples after warm-up. Bandwidth = (K/V bytes of the live tokens
+ q + out) / time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.results_io import RunWriter  # noqa: E402

N, K, H, G = 32, 8, 128, 16
DTYPE = jnp.bfloat16
L2_BYTES = 50 * 2**20
# ejkernel's defaults (16 pages x 16 tokens per KV block, 128 queries per block) ask for
# 256 KB of shared memory, more than an H100 has (227 KB): its launch fails. These fit.
EJKERNEL_OPTIONS = {"num_kv_pages_per_block": 8, "num_queries_per_block": 16}


def env_info():
    d = jax.devices()[0]
    return dict(
        device=getattr(d, "device_kind", str(d)),
        jax=jax.__version__,
        date=datetime.date.today().isoformat(),
    )


def make_runner(step, unroll):
    """jit of `unroll` chained calls of step(q, table, data, *args) over tables[i % len].

    Big arrays (`data`: KV pools) are arguments, never closure constants: captured
    constants are embedded in the executable and make every compile copy gigabytes.
    """

    @jax.jit
    def run(q, tables, data, *args):
        for i in range(unroll):
            q = step(q, tables[i % len(tables)], data, *args).astype(q.dtype)
        return q

    return run


def time_runner(run, q0, tables, data, args, unroll, est_s, samples=5):
    """Median seconds per call, and the relative spread of the samples."""
    for _ in range(2):
        jax.block_until_ready(run(q0, tables, data, *args))
    reps = int(min(200, max(2, math.ceil(3e-3 / max(est_s * unroll, 1e-7)))))
    ts = []
    for _ in range(samples):
        q = q0
        t0 = time.perf_counter()
        for _ in range(reps):
            q = run(q, tables, data, *args)
        jax.block_until_ready(q)
        ts.append((time.perf_counter() - t0) / (reps * unroll))
    med = statistics.median(ts)
    return med, (max(ts) - min(ts)) / med


def time_chain(step, q0, tables, data, unroll, est_s):
    """Median seconds per call of step(q, table, data), and the spread (prefill script)."""
    run = make_runner(step, unroll)
    return time_runner(run, q0, tables, data, (), unroll, est_s)


class DecodeCase:
    """Pool, equal and random lengths, and `copies` disjoint page tables for one (B, L)."""

    def __init__(self, B, L, seed=0):
        rng = np.random.default_rng(seed)
        self.B, self.L = B, L
        P = L // G
        self.lens = {
            "equal": np.full(B, L, np.int32),
            "random": rng.integers(1, L + 1, B).astype(np.int32),
        }
        kv_bytes_one = B * L * K * H * 2 * 2
        self.copies = int(min(16, max(1, math.ceil(4 * L2_BYTES / kv_bytes_one))))
        A = self.copies * B * P
        # copy c uses pages [c*B*P, (c+1)*B*P) in a random order (cuDNN wants that block range)
        self.tables = [
            jnp.asarray((c * B * P + rng.permutation(B * P)).astype(np.int32).reshape(B, P))
            for c in range(self.copies)
        ]
        kk, kq = jax.random.split(jax.random.PRNGKey(seed))
        self.kv_pages = jax.random.normal(kk, (2, K, A, G, H), DTYPE)  # ours: (2, K, A, G, H)
        self.q = jax.random.normal(kq, (B, N, H), DTYPE)
        self.A, self.P = A, P

    def bytes(self, mode):
        return int(self.lens[mode].sum()) * K * H * 2 * 2 + 2 * self.B * N * H * 2


def variant_name(options: dict) -> str:
    """`jaxmm[k=v,...]`: the implementation key of `jaxmm` with DecodeOptions `options`."""
    vals = (v if isinstance(v, str) else json.dumps(v) for v in options.values())
    return "jaxmm[" + ",".join(f"{k}={v}" for k, v in zip(options, vals)) + "]"


def parse_variants(text: str | None) -> dict:
    """--variants JSON (a list of DecodeOptions kwargs) -> {impl name: DecodeOptions}."""
    from jaxmm.kernels.gpu.decode import DecodeOptions

    variants = {}
    for options in json.loads(text) if text else []:
        if not isinstance(options, dict) or not options:
            raise ValueError(f"each variant must be a non-empty dict, got {options!r}")
        variants[variant_name(options)] = DecodeOptions(**options)  # bad keys fail here
    return variants


def build_step(impl, case, plan, options=None):
    """(step(q, table, data, lens), data) for one implementation, or None to skip.

    `options`: a DecodeOptions for our kernel (the `jaxmm[...]` variants).
    """
    B = case.B
    sm_scale = 1.0 / math.sqrt(H)
    cu = jnp.arange(B + 1, dtype=jnp.int32)
    ns = jnp.array([B], jnp.int32)
    if impl == "jaxmm":
        from jaxmm.kernels.gpu.ragged_paged_attention import paged_attention

        data = case.kv_pages

        def step(q, table, kv, lens):
            return paged_attention(
                q, kv, lens, table, cu, ns, sm_scale=sm_scale, plan=plan, decode_options=options
            )

    elif impl == "jaxmm_kernel":
        from jaxmm.kernels.gpu import decode
        from jaxmm.kernels.gpu.ragged_paged_attention import decode_kwargs, make_plan

        p = make_plan(B, N, K, B, case.P, G, H, DTYPE, False, dict(plan or ()), options)
        data = case.kv_pages

        def step(q, table, kv, lens):
            return decode.decode_attention(
                q,
                kv,
                lens,
                table,
                ns,
                q,
                num_seqs=B,
                sm_scale=sm_scale,
                sliding_window=None,
                soft_cap=None,
                **decode_kwargs(p),
            )

    elif impl == "jax_triton":
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as pa

        data = jax.block_until_ready((case.kv_pages[0] + 0, case.kv_pages[1] + 0))
        ksplit = 16 if case.P % 16 == 0 else 1

        def step(q, table, kv, lens):
            return pa(q * sm_scale, kv[0], kv[1], table, lens, k_splits=ksplit)

    elif impl == "cudnn":
        from jax._src.cudnn.fused_attention_stablehlo import MaskType
        from jax._src.cudnn.fused_attention_stablehlo import paged_attention as cpa

        kc = jnp.transpose(case.kv_pages[0], (1, 2, 0, 3))  # (A, G, K, H)
        vc = jnp.transpose(case.kv_pages[1], (1, 2, 0, 3))
        n = B * case.P  # cuDNN: a pool of exactly B * P blocks per call
        case.cudnn_tables = [
            (t - c * n, kc[c * n : (c + 1) * n], vc[c * n : (c + 1) * n])
            for c, t in enumerate(case.tables)
        ]
        jax.block_until_ready(case.cudnn_tables)
        del kc, vc
        qlen = jnp.ones((B,), jnp.int32)
        data = ()

        def step(q, table_kv, _, lens):
            table, kc, vc = table_kv
            pt = table[:, None, :, None]
            o = cpa(
                q[:, None],
                kc,
                vc,
                qlen,
                lens,
                pt,
                pt,
                scale=sm_scale,
                mask_type=MaskType.PADDING,
                qkv_layout="BTNH",
            )
            return o[:, 0]

    elif impl == "xla_ref":
        if B * case.L > 8 * 8192:
            return None
        from jaxmm.kernels import reference

        data = case.kv_pages

        def step(q, table, kv, lens):
            real = reference.write_kv
            reference.write_kv = lambda k, v, pages, *a: pages  # time attention only
            try:
                zk = jnp.zeros((B, K, H), DTYPE)
                return reference.ragged_paged_attention(
                    q, zk, zk, kv, lens, table, cu, ns, sm_scale=sm_scale
                )[0]
            finally:
                reference.write_kv = real

    elif impl == "ejkernel":
        import importlib

        rpa = importlib.import_module(
            "ejkernel.kernels._triton.ragged_page_attention_v3._triton_impl_fwd"
        )
        data = jax.block_until_ready(jnp.transpose(case.kv_pages, (2, 3, 1, 0, 4)))
        new_kv = jax.random.normal(jax.random.PRNGKey(1), (B, K, H), DTYPE)
        dist = jnp.array([B, B, B], jnp.int32)  # [decodes, + prefills, + chunked]: all decode

        def step(q, table, kv, lens):
            real = rpa._kv_update_scatter
            rpa._kv_update_scatter = lambda **kw: kw["kv_cache"]  # time attention only
            try:
                return rpa.ragged_paged_attention_triton(
                    q,
                    new_kv,
                    new_kv,
                    kv,
                    lens,
                    table.reshape(-1),
                    cu,
                    dist,
                    None,
                    softmax_scale=sm_scale,
                    **EJKERNEL_OPTIONS,
                )[0]
            finally:
                rpa._kv_update_scatter = real

    else:
        raise ValueError(impl)
    return step, data


def kernel_breakdown(run, args, unroll: int) -> dict:
    """Device microseconds per call by kernel name (jax.profiler, as profile_step.py)."""
    import tempfile

    from benchmarks.profile_step import profile

    with tempfile.TemporaryDirectory() as d:
        prof = profile(lambda: run(*args), iters=5, workdir=d)
    return {
        "device_us": round(prof["device_ms_per_step"] * 1e3 / unroll, 2),
        "kernels_us": [
            [n[:60], round(ms * 1e3 / unroll, 2)] for n, ms, _ in prof["top_kernels_ms"]
        ],
    }


def run_case(
    case: DecodeCase,
    impls,
    modes=("equal", "random"),
    plan=None,
    sink=None,
    variants=None,
    profile=False,
):
    """Time each implementation on both length modes; `variants`: {name: DecodeOptions}.

    profile: also record each call's device time by kernel (`kernel_breakdown`).
    """
    rows = []
    variants = variants or {}
    for impl in impls:
        base = dict(bench="decode", impl=impl, B=case.B, L=case.L)
        if plan:
            base["plan"] = dict(plan)
        try:
            if impl in variants:
                built = build_step("jaxmm", case, plan, variants[impl])
            else:
                built = build_step(impl, case, plan)
            if built is None:
                continue
            step, data = built
            unroll = 8 if case.B * case.L <= 8 * 2048 else 2
            run = make_runner(step, unroll)
        except Exception as e:
            rows.append(dict(base, error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(json.dumps(rows[-1]), flush=True)
            continue
        for mode in modes:
            try:
                lens = jnp.asarray(case.lens[mode])
                nbytes = case.bytes(mode)
                tables = case.cudnn_tables if impl == "cudnn" else case.tables
                est = nbytes / 2.5e12
                t, spread = time_runner(run, case.q, tables, data, (lens,), unroll, est)
                row = dict(
                    base,
                    lengths=mode,
                    ms=round(t * 1e3, 4),
                    tb_s=round(nbytes / t / 1e12, 3),
                    spread=round(spread, 3),
                )
                if profile:
                    row.update(kernel_breakdown(run, (case.q, tables, data, lens), unroll))
            except Exception as e:
                row = dict(base, lengths=mode, error=f"{type(e).__name__}: {str(e)[:300]}")
            print(json.dumps(row), flush=True)
            rows.append(row)
            if sink:
                sink(row)
    return rows


def sweep(sink=None):
    """Tile/launch variants of our kernel on a few shapes (docs/performance.md)."""
    rows = []
    case = DecodeCase(64, 2048)
    for gather in ("page", "token"):
        for bk, warps, stages in [(64, 4, 3), (128, 8, 3), (64, 4, 4), (128, 4, 3)]:
            plan = (
                ("decode_block_k", bk),
                ("decode_warps", warps),
                ("decode_stages", stages),
                ("gather", gather),
            )
            rows += run_case(case, ["jaxmm"], ("equal",), plan=plan, sink=sink)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--impls", default="jaxmm,jaxmm_kernel,jax_triton,cudnn,xla_ref")
    ap.add_argument("--batch", default="1,8,64,256")
    ap.add_argument("--ctx", default="512,2048,8192")
    ap.add_argument("--modes", default="equal,random")
    ap.add_argument("--shapes", default=None, help="B:L,B:L,... instead of --batch x --ctx")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument(
        "--variants",
        default=None,
        help="JSON list of gpu.decode.DecodeOptions kwarg dicts, each timed as jaxmm[k=v,...]",
    )
    ap.add_argument("--profile", action="store_true", help="device time per kernel, per call")
    ap.add_argument("--out", default=None, help="results file to append this run to")
    ap.add_argument("--run-name", default="run", help="the run's variant name in --out")
    ap.add_argument("--ejkernel-options", default=None, help="JSON kwargs for ejkernel's call")
    a = ap.parse_args(argv)
    if a.ejkernel_options:
        EJKERNEL_OPTIONS.update(json.loads(a.ejkernel_options))
    variants = parse_variants(a.variants)
    impls = a.impls.split(",")
    # variant columns right after `jaxmm` (at the end if it is not measured)
    at = impls.index("jaxmm") + 1 if "jaxmm" in impls else len(impls)
    impls[at:at] = list(variants)
    info = env_info()
    print(json.dumps(dict(bench="env", **info)), flush=True)
    rows = []
    done = []
    out = None
    if a.out:
        out = RunWriter(
            a.out,
            benchmark="attention_decode",
            script="benchmarks/attention_decode.py",
            variant=a.run_name,
            env=info,
        )

    def sink(row):  # rewrite the results file after every row: a timeout keeps what ran
        done.append(row)
        if out:
            out.write(rows=done)

    if a.sweep:
        rows += sweep(sink)
    else:
        if a.shapes:
            shapes = [tuple(map(int, x.split(":"))) for x in a.shapes.split(",")]
        else:
            shapes = [
                (B, L) for B in map(int, a.batch.split(",")) for L in map(int, a.ctx.split(","))
            ]
        for B, L in shapes:
            case = DecodeCase(B, L)
            rows += run_case(
                case, impls, a.modes.split(","), sink=sink, variants=variants, profile=a.profile
            )
            del case
    if out:
        out.write(rows=rows)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, ".")
    main()
