"""Where one engine step's GPU time goes, kernel by kernel (random weights, no download).

    python benchmarks/profile_step.py --config llama-3.1-8b            # GPU
    python benchmarks/profile_step.py --config tiny --decode 8 --prefill 2x48   # CPU smoke

Builds the runner of `throughput.py`'s config, then profiles (jax.profiler, read back with
`jax.profiler.ProfileData`) two kinds of step the throughput run is made of:

  decode  --decode sequences, one new token each at context --context;
  mixed   the same decodes plus --prefill chunks (N x L fresh tokens) in one bucket.

For each, the step is run --iters times under the profiler; device events are summed by
name and by class (matmul library calls, our Pallas kernels, XLA fusions, copies), each with
its milliseconds per step and its share. Prints one JSON line per kind of step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.throughput import CONFIGS, write_config  # noqa: E402


def classify(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemm", "cutlass", "nvjet", "cublas", "sm90_xmma", "matmul")):
        return "matmul"
    if any(k in n for k in ("ragged", "decode", "prefill", "kv_write", "pallas", "triton")):
        return "pallas"
    if "fusion" in n or "loop_" in n or "input_" in n:
        return "fusion"
    if "memcpy" in n or "memset" in n or "copy" in n:
        return "copy"
    return "other"


def device_events(path: str, seen: list | None = None):
    """(name, duration_ns) of every kernel event on the device planes of a trace."""
    from jax.profiler import ProfileData

    pd = ProfileData.from_file(path)
    for plane in pd.planes:
        if seen is not None:
            seen.extend(f"{plane.name} | {line.name}" for line in plane.lines)
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            lname = line.name.lower()
            if "stream" not in lname and plane.name.startswith("/device:GPU"):
                continue  # keep kernel streams, skip XLA op / module summary lines
            for ev in line.events:
                yield ev.name, ev.duration_ns


def _device_intervals(pd):
    """(start_ns, end_ns, name) of every kernel on the GPU's stream lines, sorted."""
    out = []
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():
                continue
            out.extend((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name) for ev in line.events)
    return sorted(out)


def gaps(path: str, iters: int, min_gap_us: float = 200.0, top: int = 12) -> dict:
    """Where the GPU sits idle between the first and the last kernel of the profiled calls.

    Kernels of all streams are merged into busy intervals; every idle stretch longer than
    min_gap_us is blamed on the innermost host Python frames (the profiler's Python tracer)
    that span it. Returns the busy and idle milliseconds per call and the longest gaps with
    the kernels either side and those frames.
    """
    from jax.profiler import ProfileData

    pd = ProfileData.from_file(path)
    kernels = _device_intervals(pd)
    if not kernels:
        return {}
    busy, idle, spans = 0, [], []
    cur_s, cur_e, cur_n = kernels[0]
    for s, e, n in kernels[1:]:
        if s > cur_e:
            spans.append((cur_s, cur_e))
            if s - cur_e > min_gap_us * 1e3:
                idle.append((cur_e, s, cur_n, n))
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e, cur_n = e, n
    spans.append((cur_s, cur_e))
    busy = sum(e - s for s, e in spans)
    host = []
    for plane in pd.planes:
        if plane.name.startswith("/host"):
            for line in plane.lines:
                if line.name == "python" or line.name.startswith("python"):
                    host.extend(
                        (ev.start_ns, ev.start_ns + ev.duration_ns, ev.name) for ev in line.events
                    )
    blame: dict[str, float] = collections.defaultdict(float)
    rows = []
    for a, b, before, after in idle:
        around = sorted((e - s, n) for s, e, n in host if s <= a and e >= b)  # innermost first
        frames = [n[:90] for _, n in around[:4]]
        blame[frames[0] if frames else "?"] += (b - a) / 1e6 / iters
        inside: dict[str, float] = collections.defaultdict(float)
        for s, e, n in host:  # the longest calls made within the gap
            if s >= a and e <= b:
                inside[n[:90]] += (e - s) / 1e6
        inner = sorted(inside.items(), key=lambda kv: -kv[1])[:4]
        rows.append(
            (b - a, before[:60], after[:60], frames, [[n, round(ms, 3)] for n, ms in inner])
        )
    rows.sort(key=lambda r: -r[0])
    first, last = kernels[0][0], max(e for _, e, _ in kernels)
    return {
        "span_ms_per_call": round((last - first) / 1e6 / iters, 3),
        "busy_ms_per_call": round(busy / 1e6 / iters, 3),
        "idle_over_min_ms_per_call": round(sum(b - a for a, b, *_ in idle) / 1e6 / iters, 3),
        "min_gap_us": min_gap_us,
        "idle_by_host_frame_ms": {
            k: round(v, 3) for k, v in sorted(blame.items(), key=lambda kv: -kv[1])[:top]
        },
        "longest_gaps": [
            {"ms": round(d / 1e6, 3), "after": bf, "before": af, "host": fr, "within": inn}
            for d, bf, af, fr, inn in rows[:top]
        ],
    }


def profile(run, iters: int, workdir: str, with_gaps: bool = False) -> dict:
    import jax

    out = run()
    jax.block_until_ready(out)
    trace_dir = os.path.join(workdir, "trace")
    shutil.rmtree(trace_dir, ignore_errors=True)
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(iters):
            out = run()
        jax.block_until_ready(out)
    wall = (time.perf_counter() - t0) / iters
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    by_name: dict[str, float] = collections.defaultdict(float)
    seen: list[str] = []
    for name, dur in device_events(files[0], seen):
        by_name[name] += dur / 1e6 / iters
    total = sum(by_name.values()) or 1e-9
    by_class: dict[str, float] = collections.defaultdict(float)
    for name, ms in by_name.items():
        by_class[classify(name)] += ms
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    res = {
        "wall_ms_per_step": round(wall * 1e3, 3),
        "device_ms_per_step": round(total, 3),
        "by_class_ms": {k: round(v, 3) for k, v in sorted(by_class.items(), key=lambda x: -x[1])},
        "top_kernels_ms": [[n[:120], round(ms, 3), round(ms / total, 3)] for n, ms in top],
        "trace_lines": sorted(set(seen))[:40],
    }
    if with_gaps:
        res["gaps"] = gaps(files[0], iters)
    return res


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="llama-3.1-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--decode", type=int, default=256, help="decoding sequences")
    ap.add_argument("--context", type=int, default=640, help="their context length")
    ap.add_argument("--prefill", default="8x480", help="N x L fresh prefill chunks (mixed)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxmm-bench"))
    args = ap.parse_args(argv)

    import jax

    from jaxmm import LLM
    from jaxmm.runner.model_runner import SeqStep

    n_pre, l_pre = (int(x) for x in args.prefill.split("x"))
    cfg = CONFIGS[args.config]
    path = os.path.join(args.workdir, args.config)
    write_config(cfg, path)
    tokens = args.decode + n_pre * l_pre
    llm = LLM(
        path,
        dtype=args.dtype,
        max_model_len=max(args.context, l_pre) + 16,
        max_num_seqs=max(args.decode + n_pre, 16),
        max_num_batched_tokens=tokens,
        skip_tokenizer_init=True,
        load_format="dummy",
    )
    r = llm.llm_engine.runner
    G = r.block_size
    pages = iter(range(1, r.num_pages))

    def table(n_tokens: int) -> list[int]:
        return [next(pages) for _ in range(-(-n_tokens // G))]

    rng = __import__("numpy").random.default_rng(0)
    V = cfg["vocab_size"]
    decodes = [
        SeqStep([int(rng.integers(V))], args.context - 1, table(args.context), True)
        for _ in range(args.decode)
    ]
    prefills = [
        SeqStep(rng.integers(0, V, l_pre).tolist(), 0, table(l_pre), True) for _ in range(n_pre)
    ]
    results = []
    for kind, steps in (("decode", decodes), ("mixed", decodes + prefills)):
        res = profile(lambda steps=steps: r.dispatch(steps).tokens, args.iters, args.workdir)
        res.update(
            kind=kind,
            config=args.config,
            sequences=len(steps),
            tokens=sum(len(s.token_ids) for s in steps),
            bucket=r.bucket(sum(len(s.token_ids) for s in steps))[0],
            context=args.context,
            prefill=args.prefill if kind == "mixed" else None,
            device=jax.devices()[0].device_kind,
            jax_version=jax.__version__,
            date=time.strftime("%Y-%m-%d"),
        )
        print(json.dumps(res), flush=True)
        results.append(res)
    return results


if __name__ == "__main__":
    main()
