"""Where the Mosaic GPU prefill kernel's time goes, per warpgroup (H100; Mosaic's on-device
profiler).

    python benchmarks/prefill_profile.py [--seq 2048] [--page-size 16] [--plan JSON]

Runs `attention_prefill.py`'s problem (one causal sequence, bf16, N=32, K=8, H=128, pages in
random order) once with `JAXMM_MGPU_PROFILE` set, so the kernel records its named scopes
(`jaxmm/kernels/gpu/prefill_mgpu.py`: q_in, qk, wait_v, wait_tc, pv_wait_k, out in the compute
warpgroups; pages, wait_free, tma in the memory warpgroup) with the SM's clock. Prints one
JSON line: per role (compute0, compute1, memory) and scope, microseconds per CTA (mean over
CTAs), calls per CTA and mean microseconds per call, the CTAs' mean busy span and the
share of the span each scope takes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROLES = ("compute0", "compute1", "memory")


def summarise(path: str) -> dict:
    """Per role and scope: us per CTA, calls per CTA, us per call; span per CTA."""
    events = json.load(open(path))["traceEvents"]
    by_tid = collections.defaultdict(list)
    for ev in events:
        by_tid[ev["tid"]].append(ev)
    tot = collections.defaultdict(float)
    calls = collections.defaultdict(int)
    spans = collections.defaultdict(list)
    ctas = collections.defaultdict(set)
    for tid, evs in by_tid.items():
        role = ROLES[(tid - 1) % len(ROLES)]
        cta = (tid - 1) // len(ROLES)
        ctas[role].add(cta)
        stack = []
        for ev in evs:
            if ev["ph"] == "B":
                stack.append(ev)
            elif stack:
                b = stack.pop()
                tot[role, b["name"]] += ev["ts"] - b["ts"]
                calls[role, b["name"]] += 1
        spans[role].append(evs[-1]["ts"] - evs[0]["ts"])
    out = {}
    for role in ROLES:
        n = max(len(ctas[role]), 1)
        span = sum(spans[role]) / n if spans[role] else 0.0
        out[role] = {
            "span_us_per_cta": round(span, 2),
            "scopes": {
                name: {
                    "us_per_cta": round(t / n, 2),
                    "calls_per_cta": round(calls[r, name] / n, 1),
                    "us_per_call": round(t / max(calls[r, name], 1), 3),
                    "share": round(t / n / span, 3) if span else None,
                }
                for (r, name), t in sorted(tot.items(), key=lambda kv: -kv[1])
                if r == role
            },
        }
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--plan", default=None, help="Plan field overrides (JSON object)")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "jaxmm-mgpu-profile"))
    a = ap.parse_args(argv)
    os.makedirs(a.dir, exist_ok=True)
    for f in glob.glob(os.path.join(a.dir, "*-trace.json")):
        os.remove(f)
    os.environ["JAXMM_MGPU_PROFILE"] = a.dir  # read when the kernel is traced

    import math

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.attention_decode import DTYPE, H, K, N
    from jaxmm.kernels.gpu.ragged_paged_attention import paged_attention
    from jaxmm.kernels.reference import write_kv

    S, G = a.seq, a.page_size
    plan = tuple(json.loads(a.plan).items()) if a.plan else None
    P, A = S // G, S // G + 7
    kq, kk, kv_ = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (S, N, H), DTYPE)
    k = jax.random.normal(kk, (S, K, H), DTYPE)
    v = jax.random.normal(kv_, (S, K, H), DTYPE)
    table = jnp.asarray(np.random.default_rng(0).permutation(A)[:P].astype(np.int32))[None]
    kv_lens, cu, ns = (jnp.array(x, jnp.int32) for x in ([S], [0, S], [1]))
    pages = write_kv(k, v, jnp.zeros((2, K, A, G, H), DTYPE), kv_lens, table, cu, ns)
    run = jax.jit(
        lambda q, pages: paged_attention(
            q, pages, kv_lens, table, cu, ns, sm_scale=1 / math.sqrt(H), plan=plan
        )
    )
    for _ in range(3):  # the last call's trace is read (warm clocks and caches)
        jax.block_until_ready(run(q, pages))
    files = sorted(glob.glob(os.path.join(a.dir, "*-trace.json")))
    res = {"bench": "prefill_profile", "S": S, "page_size": G, "plan": dict(plan or ())}
    if files:
        res["profile"] = summarise(files[-1])
        res["traces"] = len(files)
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
