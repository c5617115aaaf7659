"""Online serving benchmark: Poisson arrivals against the OpenAI-compatible server, and the
same workload through the offline engine for comparison. Prints one JSON line.

    # against a running server (streams /v1/completions with token-id prompts)
    python benchmarks/serving.py --url http://127.0.0.1:8000 --model-name M --api-key K \
        --num-requests 200 --request-rate 8 --input-len 256 --output-len 64
    # start a server in-process over a random-weight config (no download, no tokenizer)
    python benchmarks/serving.py --config tiny --num-requests 16 --request-rate 20 \
        --input-len 32 --output-len 16
    # ... or over a checkpoint directory (--load-format dummy: its config, random weights)
    python benchmarks/serving.py --model /path/to/ckpt --load-format dummy

TTFT is the time from sending a request to its first streamed token, ITL the gap between
successive tokens (a chunk carrying k tokens counts as k gaps of 1/k of its wait), E2E the
whole request; each is reported as p50/p90/p99 in ms. The offline run feeds the same
prompts at the same arrival times straight into the LLMEngine (after the server stopped,
in the same engine, so both use one compiled engine; from a cold prefix cache, as the HTTP
run had) and times tokens as `step()` returns them: the difference is the cost of HTTP,
JSON, SSE and the front end.

The server's engine runs in a process of its own (as `jaxmm serve` runs text models; the
offline run then happens in that process too) or, with --no-engine-process, on a thread of
the server's process. The load comes from --client-procs processes that warm up with
prompts of their own, then start together. --timeline adds where each request's time goes
inside the server; --profile samples the server process's threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time

import numpy as np


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(xs) * 1000.0
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p90": round(float(np.percentile(a, 90)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "mean": round(float(a.mean()), 3),
    }


def summarize(records: list[dict], duration: float) -> dict:
    ok = [r for r in records if r.get("error") is None]
    out_tokens = sum(r["output_tokens"] for r in ok)
    itl: list[float] = []
    for r in ok:
        itl.extend(r["itl"])
    return {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({r["error"] for r in records if r.get("error")})[:5],
        "duration_s": round(duration, 3),
        "requests_per_s": round(len(ok) / duration, 3) if duration else None,
        "output_tokens_per_s": round(out_tokens / duration, 2) if duration else None,
        "ttft_ms": percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
        "itl_ms": percentiles(itl),
        "e2e_ms": percentiles([r["e2e"] for r in ok]),
    }


def workload(args, vocab_size: int) -> tuple[list[list[int]], list[float]]:
    """Random token-id prompts and Poisson arrival offsets (seconds from the start)."""
    rng = np.random.default_rng(args.seed)
    # avoid the lowest ids: small tokenizers keep their special tokens there
    prompts = [
        rng.integers(min(16, vocab_size - 1), vocab_size, args.input_len).tolist()
        for _ in range(args.num_requests)
    ]
    if args.request_rate == float("inf"):
        offsets = [0.0] * args.num_requests
    else:
        gaps = rng.exponential(1.0 / args.request_rate, args.num_requests)
        offsets = np.cumsum(gaps).tolist()
        offsets = [o - offsets[0] for o in offsets]
    return prompts, offsets


# -- the HTTP side --------------------------------------------------------------------------


async def one_request(client, url: str, body: dict, headers: dict, delay: float, rec: dict):
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    last, n_tokens = t0, 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                rec["error"] = f"HTTP {r.status_code}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    rec["error"] = f"stream error {event['error'].get('code')}"
                    return
                if event.get("usage") and not event.get("choices"):
                    rec["usage_tokens"] = event["usage"]["completion_tokens"]
                    continue
                now = time.perf_counter()
                k = 0
                for c in event.get("choices", []):
                    lp = c.get("logprobs")
                    k += len(lp["tokens"]) if lp else (1 if c.get("text") else 0)
                if k == 0:
                    continue
                if rec["ttft"] is None:
                    rec["ttft"] = now - t0
                    k -= 1
                rec["itl"].extend([(now - last) / max(k, 1)] * k)
                n_tokens += k + (1 if n_tokens == 0 else 0)
                last = now
    except Exception as e:  # a transport failure counts as a failed request
        rec["error"] = type(e).__name__
        return
    rec["e2e"] = time.perf_counter() - t0
    rec["output_tokens"] = rec.get("usage_tokens", n_tokens)


async def run_http(
    args, base_url: str, model: str, prompts, offsets, *, ready=None
) -> tuple[list[dict], float, float]:
    """Send `prompts` at `offsets` (s); returns (records, start, end) in `time.time()` terms.

    `ready`, when given, is awaited after the warmup requests and returns the wall-clock
    time to start at (the barrier that lines up several client processes).
    """
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    records = [{"ttft": None, "itl": [], "error": None, "output_tokens": 0} for _ in prompts]

    def body(p: list[int]) -> dict:
        return {
            "model": model,
            "prompt": p,
            "max_tokens": args.output_len,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            # one token per chunk even without a tokenizer (no text to stream)
            "logprobs": 0,
        }

    limits = httpx.Limits(max_connections=max(len(prompts), 1), max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(args.timeout)) as client:
        # untimed, first-use costs (connections, pools); prompts of their own, so that no
        # timed prompt finds its pages in the prefix cache
        rng = np.random.default_rng(args.seed + 1_000_003)
        for _ in range(args.warmup_requests):
            vocab = args.vocab_size or 256
            p = rng.integers(min(16, vocab - 1), vocab, args.input_len).tolist()
            warm = {"ttft": None, "itl": [], "error": None, "output_tokens": 0}
            await one_request(client, base_url + "/v1/completions", body(p), headers, 0.0, warm)
        start = time.time()
        if ready is not None:
            start = await ready()
            await asyncio.sleep(max(0.0, start - time.time()))
        await asyncio.gather(
            *(
                one_request(
                    client,
                    base_url + "/v1/completions",
                    body(p),
                    headers,
                    off + start - time.time(),
                    rec,
                )
                for p, off, rec in zip(prompts, offsets, records, strict=True)
            )
        )
        end = time.time()
    return records, start, end


class _Server:
    """uvicorn on 127.0.0.1 (a free port) in a thread, over an AsyncEngine."""

    def __init__(self, app, http: str = "auto", loop: str = "auto"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", http=http, loop=loop)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def run_client_processes(args, url: str, model: str, vocab_size: int) -> tuple:
    """The load generator in `--client-procs` processes (this script with --url and --shard),
    each sending every N-th request of the same workload (same seed and vocab). They warm up,
    report ready, and start together at a time this process sends them; the summary is over
    all their records, from that start to the last one's end."""
    import subprocess

    n = max(1, args.client_procs)
    cmd = [sys.executable, os.path.abspath(__file__), "--url", url, "--model-name", model]
    cmd += ["--vocab-size", str(vocab_size), "--seed", str(args.seed)]
    cmd += ["--num-requests", str(args.num_requests), "--request-rate", str(args.request_rate)]
    cmd += ["--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    cmd += ["--warmup-requests", str(args.warmup_requests), "--timeout", str(args.timeout)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    procs = [
        subprocess.Popen(
            [*cmd, "--shard", f"{i}/{n}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    try:
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a client process failed: {p.stderr.read()[-2000:]}")
        start = time.time() + 0.2
        for p in procs:
            p.stdin.write(f"{start}\n")
            p.stdin.flush()
        records: list[dict] = [{} for _ in range(args.num_requests)]
        end = start
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=args.timeout + 60)
            if p.returncode != 0:
                raise RuntimeError(f"a client process failed: {err[-2000:]}")
            shard = json.loads(out.strip().splitlines()[-1])
            for j, rec in zip(range(i, args.num_requests, n), shard["records"], strict=True):
                records[j] = rec
            end = max(end, shard["end"])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return records, start, end


class StackSampler(threading.Thread):
    """A sampling profiler of this process's threads (`--profile`): every `interval` s it
    records each thread's stack; `report()` lists, per thread, the functions that were on
    the stack most often (inclusive) and the most frequent innermost frames."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval = interval
        self.stop = threading.Event()
        self.samples = 0
        self.inclusive: dict = {}
        self.leaf: dict = {}

    def run(self) -> None:
        from collections import Counter

        me = threading.get_ident()
        while not self.stop.is_set():
            names = {t.ident: t.name for t in threading.enumerate()}
            for tid, frame in sys._current_frames().items():
                if tid == me:
                    continue
                name = names.get(tid, str(tid))
                stack = []
                f = frame
                while f is not None:
                    code = f.f_code
                    stack.append(f"{os.path.basename(code.co_filename)}:{code.co_name}")
                    f = f.f_back
                self.inclusive.setdefault(name, Counter()).update(set(stack))
                self.leaf.setdefault(name, Counter())[" < ".join(stack[:3])] += 1
            self.samples += 1
            time.sleep(self.interval)

    def report(self) -> dict:
        return {
            name: {
                "samples": sum(self.leaf[name].values()),
                "inclusive": self.inclusive[name].most_common(30),
                "leaf": self.leaf[name].most_common(20),
            }
            for name in self.leaf
        }


class ServerTimeline:
    """Where a request's time goes inside the server (`--timeline`, with --engine-process):
    wraps the ProcessEngine's add_request and message handler to record, per request, when
    the front end submitted it and got the engine's acknowledgement, and when the server
    process received its first and its last output; the engine's own first-token time comes
    with the outputs. All in `time.monotonic()` (one clock for both processes)."""

    def __init__(self, client):
        self.by_prompt: dict[tuple, dict] = {}
        self.by_rid: dict[str, dict] = {}
        add, on_message = client.add_request, client._on_message

        async def add_request(rid, prompt, params, **kw):
            rec = {"submit": time.monotonic()}
            self.by_prompt[tuple(kw.get("prompt_ids") or ())] = self.by_rid[rid] = rec
            stream = await add(rid, prompt, params, **kw)
            rec["ack"] = time.monotonic()
            return stream

        def handle(msg):
            if msg[0] == "out":
                now = time.monotonic()
                for rid, finished, _, metrics, _ in msg[1]:
                    rec = self.by_rid.get(rid)
                    if rec is None:
                        continue
                    rec.setdefault("first_received", now)
                    if metrics.get("first_token_time") is not None:
                        rec["engine_first_token"] = metrics["first_token_time"]
                    if finished:
                        rec["done_received"] = now
            on_message(msg)

        client.add_request = add_request
        client._on_message = handle

    def report(self, prompts, offsets, start_wall: float, records: list[dict]) -> dict:
        """Per-stage percentiles (ms) from each request's scheduled arrival."""
        start = start_wall - time.time() + time.monotonic()  # the start in monotonic terms
        stages: dict[str, list] = {}
        for p, off, client_rec in zip(prompts, offsets, records, strict=True):
            rec = self.by_prompt.get(tuple(p))
            if rec is None:
                continue
            t0 = start + off
            for name in ("submit", "ack", "engine_first_token", "first_received", "done_received"):
                if name in rec:
                    stages.setdefault(name, []).append(rec[name] - t0)
            if client_rec.get("ttft") is not None and "first_received" in rec:
                stages.setdefault("client_first_token", []).append(client_rec["ttft"])
            if client_rec.get("e2e") is not None:
                stages.setdefault("client_done", []).append(client_rec["e2e"])
        return {name: percentiles(v) for name, v in stages.items()}


# -- the offline side -----------------------------------------------------------------------


def run_offline(engine, args, prompts, offsets) -> dict:
    from jaxmm import SamplingParams

    # the HTTP run left these prompts' pages in the prefix cache: start from a cold cache, as
    # the HTTP run did
    engine.reset_prefix_cache()

    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, logprobs=0)
    records = [{"ttft": None, "itl": [], "error": None, "output_tokens": 0} for _ in prompts]
    start: dict[str, float] = {}
    last: dict[str, float] = {}
    seen: dict[str, int] = {}
    t0 = time.perf_counter()
    nxt = 0
    while nxt < len(prompts) or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while nxt < len(prompts) and offsets[nxt] <= now:
            rid = f"off-{nxt}"
            engine.add_request(rid, None, sp, time.monotonic(), prompt_ids=prompts[nxt])
            # from the scheduled arrival (as the HTTP client measures), not from when the
            # loop got to it: a request arriving mid-step waits for that step either way
            start[rid] = last[rid] = t0 + offsets[nxt]
            seen[rid] = 0
            nxt += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(offsets[nxt] - now, 0.01)))
            continue
        for out in engine.step():
            rid = out.request_id
            rec = records[int(rid.split("-")[1])]
            t = time.perf_counter()
            n = len(out.outputs[0].token_ids)
            k = n - seen[rid]
            if k > 0:
                if rec["ttft"] is None:
                    rec["ttft"] = t - start[rid]
                    k -= 1
                rec["itl"].extend([(t - last[rid]) / max(k, 1)] * k)
                seen[rid], last[rid] = n, t
            if out.finished:
                rec["e2e"] = t - start[rid]
                rec["output_tokens"] = n
    return summarize(records, time.perf_counter() - t0)


# -- main -----------------------------------------------------------------------------------


def engine_kwargs(args) -> tuple[str, dict]:
    """(checkpoint path, LLM keyword arguments) of the engine under test."""
    if args.model is None:
        try:
            from benchmarks.throughput import CONFIGS, write_config
        except ImportError:  # run as a script: benchmarks/ itself is on sys.path
            from throughput import CONFIGS, write_config

        cfg = CONFIGS[args.config]
        path = os.path.join(args.workdir, args.config)
        write_config(cfg, path)
        load_format, skip_tok = "dummy", True
    else:
        path, load_format = args.model, args.load_format
        skip_tok = not os.path.exists(os.path.join(path, "tokenizer_config.json"))
    return path, dict(
        model=path,
        dtype=args.dtype,
        max_model_len=args.max_model_len or args.input_len + args.output_len + 8,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        skip_tokenizer_init=skip_tok,
        load_format=load_format,
        warmup=args.warmup,
    )


def device_info() -> dict:
    import jax

    return {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
    }


def core_info(engine) -> dict:
    """Run where the engine is (maybe its own process): the vocabulary size and the device."""
    return {"vocab_size": engine.hf_config.vocab_size, **device_info()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = ap.add_argument_group("what to benchmark (one of)")
    src.add_argument("--url", help="a running server's base URL (no offline comparison)")
    src.add_argument("--model", help="checkpoint directory: start a server in-process")
    src.add_argument("--config", default="tiny", help="a benchmarks/throughput.py config name")
    ap.add_argument("--model-name", help="`model` to send (default: what /v1/models lists)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--load-format", default="auto", help="'dummy': random weights")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=None, help="for --url: prompt id range")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--warmup-requests", type=int, default=1, help="untimed, sent first")
    ap.add_argument("--offline", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--http", default="auto", help="uvicorn HTTP implementation (auto: httptools)")
    ap.add_argument("--loop", default="auto", help="uvicorn event loop (auto: uvloop)")
    ap.add_argument("--profile", help="write a sampling profile of the server's threads here")
    ap.add_argument(
        "--client-procs",
        type=int,
        default=4,
        help="load generator processes (default 4), as real clients are; 0: a task in the "
        "server's process, sharing its interpreter lock",
    )
    ap.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the engine core in a process of its own (as `jaxmm serve` runs text models); "
        "--no-engine-process: on a thread of the server process",
    )
    ap.add_argument(
        "--timeline",
        action="store_true",
        help="with --engine-process: per-stage times inside the server (ServerTimeline)",
    )
    ap.add_argument("--shard", help=argparse.SUPPRESS)  # i/N: one of the client processes
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxmm-bench"))
    args = ap.parse_args(argv)

    result: dict = {
        "benchmark": "serving",
        "client_procs": 0 if args.url else args.client_procs,
        "engine_process": bool(args.engine_process and not args.url),
        "num_requests": args.num_requests,
        "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
        "input_len": args.input_len,
        "output_len": args.output_len,
    }
    if args.url:
        return run_client(args, result)

    from jaxmm.server.app import build_app

    path, kwargs = engine_kwargs(args)
    model = args.model_name or path
    if args.engine_process:
        from jaxmm.engine.core_process import ProcessEngine
        from jaxmm.llm import engine_config

        client = ProcessEngine(engine_config(**kwargs))
        info = client.call(core_info)
        engine = None
    else:
        from jaxmm import LLM
        from jaxmm.engine.async_engine import AsyncEngine

        engine = LLM(**kwargs).llm_engine
        client = AsyncEngine(engine)
        info = core_info(engine)
    vocab = args.vocab_size = info.pop("vocab_size")
    prompts, offsets = workload(args, vocab)
    timeline = ServerTimeline(client) if args.timeline and args.engine_process else None
    app = build_app(client, served_model_names=[model], api_keys=args.api_key)
    server = _Server(app, http=args.http, loop=args.loop)
    sampler = StackSampler() if args.profile else None
    if sampler is not None:
        sampler.start()
    try:
        if args.client_procs > 0:
            records, start, end = run_client_processes(args, server.url, model, vocab)
        else:
            records, start, end = asyncio.run(run_http(args, server.url, model, prompts, offsets))
        result["server"] = summarize(records, end - start)
        if timeline is not None:
            result["server_timeline_ms"] = timeline.report(prompts, offsets, start, records)
        if sampler is not None:
            sampler.stop.set()
            sampler.join()
            with open(args.profile, "w") as f:
                json.dump(sampler.report(), f, indent=1)
        server.stop()
        if args.offline and engine is None:  # the same engine, in its process, after HTTP
            result["offline"] = client.call(run_offline, args, prompts, offsets)
    finally:
        server.stop()
        client.shutdown()
    if args.offline and engine is not None:
        result["offline"] = run_offline(engine, args, prompts, offsets)
    if args.offline:
        s, o = result["server"], result["offline"]
        if s["ttft_ms"]["p50"] is not None and o["ttft_ms"]["p50"] is not None:
            result["ttft_overhead_ms_p50"] = round(s["ttft_ms"]["p50"] - o["ttft_ms"]["p50"], 3)
        if s["output_tokens_per_s"] and o["output_tokens_per_s"]:
            result["throughput_ratio"] = round(
                s["output_tokens_per_s"] / o["output_tokens_per_s"], 3
            )
    result.update(
        model=os.path.basename(os.path.normpath(path)), **info, python=platform.python_version()
    )
    print(json.dumps(result))
    sys.stdout.flush()
    return result


def run_client(args, result: dict) -> dict:
    """--url: load a running server. As a --shard of run_client_processes: print "ready"
    after the warmup, wait for the start time on stdin, print this shard's records."""
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = (
        args.model_name
        or httpx.get(args.url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    )
    prompts, offsets = workload(args, args.vocab_size or 256)
    url = args.url.rstrip("/")
    if args.shard:
        i, n = (int(x) for x in args.shard.split("/"))

        async def ready() -> float:
            print("ready", flush=True)
            line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            return float(line)

        records, _, end = asyncio.run(
            run_http(args, url, model, prompts[i::n], offsets[i::n], ready=ready)
        )
        print(json.dumps({"records": records, "end": end}))
        sys.stdout.flush()
        return result
    records, start, end = asyncio.run(run_http(args, url, model, prompts, offsets))
    result["target"] = args.url
    result["server"] = summarize(records, end - start)
    print(json.dumps(result))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
