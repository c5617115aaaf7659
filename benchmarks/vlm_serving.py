"""Multimodal serving benchmark: image chat requests against the OpenAI-compatible server, the
same workload through the offline engine, and transformers as the peer. JSON lines.

    python benchmarks/vlm_serving.py                                       # GPU, 2B shape
    python benchmarks/vlm_serving.py --smoke                               # CPU, tiny

The checkpoint is `vlm_ttft.write_checkpoint`'s (Qwen2-VL-2B shape, random bf16 weights,
`load_format="dummy"`). The server is `jaxmm serve`'s app on a real uvicorn in this process,
the engine core in a process of its own (--no-engine-process: on a thread here).

Workload, per load: streaming /v1/chat/completions, one system turn and one user turn of an
`image_url` part (a data: URI of PNG or JPEG bytes, made with numpy + Pillow) and a question,
`max_tokens=--output-len` with `ignore_eos`. Distinct images are --sizes[0]² or, with
probability --mix, --sizes[1]²; --repeat of the requests show an earlier image of the same
load again under the same `uuid` (every image part carries its uuid, so a repeat is served
from the engine's caches without processing or encoding; --repeat-media none sends the
repeat as `image_url: null` + uuid, vLLM's uuid-only form, which is refused while the first
showing is still being prepared: expect failures in a burst). Loads: Poisson arrivals at
each of --request-rates (--num-requests each), then a burst of --burst requests at once
(saturation). Every load has images and uuids of its own. The load comes from
--client-procs processes, as real clients are.

Offline, in the same engine after the server stopped (from cold prefix, encoder and
processed-item caches, as each HTTP load started): the same prompts (same images as the same
data URIs, same uuids) at the same arrival offsets, `prepare_multimodal_prompt` on as many
threads as the core prepares prompts with, then `LLMEngine.add_request`; tokens timed as
`step()` returns them. The difference is the cost of HTTP, JSON, SSE and chat rendering.

Peer: transformers' batched `generate` (bf16, same GPU, after the engine has shut down) on
the first --hf-prompts prompts of the burst, in batches of --hf-batch: images/s.

One JSON line per load (TTFT/ITL/E2E p50/p90/p99 ms, output tok/s, images/s, for HTTP and
offline), then a summary line: targets computed from the loads (HTTP >= 95% of offline
images/s at saturation; TTFT p50 at the lowest rate within +5 ms of offline; images/s at
saturation >= 5x transformers), the device, the versions and what limits each number.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import pickle
import platform
import sys
import tempfile
import time
from dataclasses import dataclass

# the engine core and, after it, torch use one GPU: keep JAX from taking most of it
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.serving import _Server, device_info, summarize  # noqa: E402
from benchmarks.vlm_ttft import PREPROCESSOR, PROMPT, Images, write_checkpoint  # noqa: E402

SYSTEM = "You are a helpful assistant."
QUESTION = "Describe this image in detail."
# the chat messages below render to vlm_ttft.PROMPT under the checkpoint's template
assert PROMPT.count(SYSTEM) == 1 and PROMPT.count(QUESTION) == 1


# -- the workload ---------------------------------------------------------------------------


@dataclass
class Load:
    """One load's requests: request i shows image `which[i]` (a data: URI of `images`) under
    `uuids[which[i]]`, arriving `offsets[i]` s after the start."""

    name: str
    request_rate: float  # inf: a burst
    offsets: list[float]
    which: list[int]
    repeat: list[bool]
    images: list[str]
    sizes: list[int]
    uuids: list[str]


def _encode(img, fmt: str) -> str:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="JPEG", quality=90)
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode()


def make_load(args: argparse.Namespace, index: int, name: str, rate: float, n: int) -> Load:
    rng = np.random.default_rng(args.seed + 7919 * index)
    draw = Images(args.seed + 7919 * index)
    n_repeat = min(int(round(args.repeat * n)), max(n - 1, 0))
    # the first request always shows a new image: a repeat needs an earlier one
    repeat_at = (
        set(rng.choice(np.arange(1, n), n_repeat, replace=False).tolist()) if n > 1 else set()
    )
    formats = ["png", "jpeg"] if args.image_format == "mixed" else [args.image_format]
    load = Load(name, rate, [], [], [], [], [], [])
    for i in range(n):
        if i in repeat_at:
            load.which.append(int(rng.integers(0, len(load.images))))
            load.repeat.append(True)
            continue
        size = args.sizes[1] if rng.random() < args.mix else args.sizes[0]
        k = len(load.images)
        load.images.append(_encode(draw(size), formats[k % len(formats)]))
        load.sizes.append(size)
        load.uuids.append(f"load{index}-image{k}")
        load.which.append(k)
        load.repeat.append(False)
    if rate == float("inf"):
        load.offsets = [0.0] * n
    else:
        gaps = rng.exponential(1.0 / rate, n)
        load.offsets = (np.cumsum(gaps) - gaps[0]).tolist()
    return load


def make_loads(args: argparse.Namespace, counts: list[int]) -> tuple[Load, list[Load]]:
    """The untimed warmup load (one image of each size, never seen again) and the timed ones:
    one per request rate, then the burst."""
    loads = [
        make_load(args, i + 1, f"rate={rate:g}", rate, n)
        for i, (rate, n) in enumerate(zip(args.request_rates, counts, strict=True))
    ]
    loads.append(make_load(args, len(loads) + 1, "burst", float("inf"), args.burst))
    draw = Images(args.seed + 1)
    warm = Load(
        "warmup",
        float("inf"),
        [0.0, 0.0],
        [0, 1],
        [False, False],
        [_encode(draw(s), "png") for s in args.sizes],
        list(args.sizes),
        ["warmup-image0", "warmup-image1"],
    )
    return warm, loads


def image_value(load: Load, i: int, repeat_media: str):
    """Request i's image as sent: its data: URI, or None for a uuid-only repeat."""
    if load.repeat[i] and repeat_media == "none":
        return None
    return load.images[load.which[i]]


def chat_body(load: Load, i: int, model: str, opts: dict) -> dict:
    url = image_value(load, i, opts["repeat_media"])
    part = {
        "type": "image_url",
        "image_url": None if url is None else {"url": url},
        "uuid": load.uuids[load.which[i]],
    }
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [part, {"type": "text", "text": QUESTION}]},
        ],
        "max_tokens": opts["output_len"],
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        # one logprob entry per token: counts tokens whatever text they decode to
        "logprobs": True,
        "top_logprobs": 0,
    }


def log(msg: str) -> None:
    """Progress on stderr (stdout holds only the JSON lines)."""
    print(f"[vlm_serving {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _record() -> dict:
    return {"ttft": None, "itl": [], "error": None, "output_tokens": 0, "prompt_tokens": None}


# -- the HTTP side --------------------------------------------------------------------------


_JSON = {"content-type": "application/json"}


async def chat_request(client, url: str, body: bytes, delay: float, rec: dict) -> None:
    """One streamed chat completion, timed as serving.one_request times completions."""
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    last, n_tokens = t0, 0
    try:
        async with client.stream("POST", url, content=body, headers=_JSON) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                rec["error"] = f"HTTP {r.status_code}: {text[:160]}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    rec["error"] = f"stream error {event['error'].get('message', '')[:160]}"
                    return
                if event.get("usage") and not event.get("choices"):
                    rec["usage_tokens"] = event["usage"]["completion_tokens"]
                    rec["prompt_tokens"] = event["usage"]["prompt_tokens"]
                    continue
                now = time.perf_counter()
                k = 0
                for c in event.get("choices", []):
                    lp = (c.get("logprobs") or {}).get("content")
                    k += len(lp) if lp else (1 if (c.get("delta") or {}).get("content") else 0)
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
    rec["output_tokens"] = rec.pop("usage_tokens", n_tokens)


async def send_load(url: str, model: str, load: Load, idx: list[int], opts: dict, start: float):
    """Requests `idx` of `load` at their offsets from wall time `start`; (records, end)."""
    import httpx

    # encoded ahead, as a client holding its requests would: the timed part is the send
    bodies = [json.dumps(chat_body(load, i, model, opts)).encode() for i in idx]
    records = [_record() for _ in idx]
    limits = httpx.Limits(max_connections=max(len(idx), 1), max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(opts["timeout"])) as client:
        await asyncio.sleep(max(0.0, start - time.time()))
        await asyncio.gather(
            *(
                chat_request(
                    client,
                    url + "/v1/chat/completions",
                    body,
                    load.offsets[i] + start - time.time(),
                    rec,
                )
                for i, body, rec in zip(idx, bodies, records, strict=True)
            )
        )
    return records, time.time()


def _client_main(conn, url: str, model: str, opts: dict, shard: int, n: int) -> None:
    """A client process: per load, read it from its file, say "ready", wait for the start
    time, send every n-th request from `shard` on, send the records back."""
    while True:
        msg = conn.recv()
        if msg is None:
            return
        with open(msg, "rb") as f:
            load = pickle.load(f)
        idx = list(range(shard, len(load.offsets), n))
        conn.send("ready")
        start = conn.recv()
        conn.send(asyncio.run(send_load(url, model, load, idx, opts, start)))


class Clients:
    """--client-procs load generator processes (spawned once, used for every load)."""

    def __init__(self, n: int, url: str, model: str, opts: dict):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for shard in range(n):
            here, there = ctx.Pipe()
            p = ctx.Process(
                target=_client_main, args=(there, url, model, opts, shard, n), daemon=True
            )
            p.start()
            self.conns.append(here)
            self.procs.append(p)

    def run(self, load: Load, path: str) -> tuple[list[dict], float, float]:
        with open(path, "wb") as f:
            pickle.dump(load, f)
        for c in self.conns:
            c.send(path)
        for c in self.conns:
            if c.recv() != "ready":
                raise RuntimeError("a client process failed")
        start = time.time() + 0.2
        for c in self.conns:
            c.send(start)
        records: list[dict] = [{} for _ in load.offsets]
        end = start
        n = len(self.conns)
        for shard, c in enumerate(self.conns):
            recs, shard_end = c.recv()
            for j, rec in zip(range(shard, len(records), n), recs, strict=True):
                records[j] = rec
            end = max(end, shard_end)
        return records, start, end

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except OSError:  # that process already died: its error is being raised
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


# -- the offline side -----------------------------------------------------------------------


def core_device(engine) -> dict:
    """Run where the engine is (maybe its own process): the device and JAX version."""
    return device_info()


def counters(engine) -> dict:
    """Run where the engine is: the multimodal items its encoders have run on so far (an
    image repeated by uuid, served from the caches, adds none) and the XLA compilations of
    its process (warmup should leave none to the timed loads)."""
    from jaxmm.runner.model_runner import backend_compile_count

    return {
        "encoded_images": int(engine.stats.get("encoder_items", 0)),
        "compilations": backend_compile_count(),
    }


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def run_offline(engine, opts: dict, path: str) -> dict:
    """The load in `path` through `engine` (in the engine's process): media prepared on the
    core's number of threads as requests arrive, each added once prepared."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from jaxmm import SamplingParams
    from jaxmm.engine.core_process import PREPARE_THREADS
    from jaxmm.multimodal.inputs import prepare_multimodal_prompt

    with open(path, "rb") as f:
        load: Load = pickle.load(f)
    # the HTTP run left this load's pages and images in the caches: start cold, as it did
    engine.reset_prefix_cache()
    engine.reset_mm_cache()
    engine.mm_frontend().cache.clear()
    sp = SamplingParams(temperature=0, max_tokens=opts["output_len"], ignore_eos=True, logprobs=0)
    prompts = [
        {
            "prompt": PROMPT,
            "multi_modal_data": {"image": [image_value(load, i, opts["repeat_media"])]},
            "multi_modal_uuids": {"image": [load.uuids[load.which[i]]]},
        }
        for i in range(len(load.offsets))
    ]
    records = [_record() for _ in prompts]
    start: dict[int, float] = {}
    last: dict[int, float] = {}
    seen: dict[int, int] = {}
    pending: dict = {}
    pool = ThreadPoolExecutor(PREPARE_THREADS)
    before = counters(engine)
    t0 = time.perf_counter()
    nxt = 0
    try:
        while nxt < len(prompts) or pending or engine.has_unfinished_requests():
            now = time.perf_counter() - t0
            while nxt < len(prompts) and load.offsets[nxt] <= now:
                pending[nxt] = pool.submit(prepare_multimodal_prompt, engine, prompts[nxt])
                # from the scheduled arrival, as the HTTP client measures
                start[nxt] = last[nxt] = t0 + load.offsets[nxt]
                seen[nxt] = 0
                nxt += 1
            for i in [i for i, fut in pending.items() if fut.done()]:
                try:
                    text, ids, mm = pending.pop(i).result()
                    engine.add_request(
                        f"off-{i}", text, sp, time.monotonic(), prompt_ids=ids, mm=mm
                    )
                    records[i]["prompt_tokens"] = len(ids)
                except Exception as e:  # refused, as the server would answer 400
                    records[i]["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            if not engine.has_unfinished_requests():
                # idle: until the next arrival or the first prepared prompt, whichever first
                timeout = (
                    max(0.0, min(load.offsets[nxt] - now, 0.01)) if nxt < len(prompts) else 0.01
                )
                if pending:
                    wait(pending.values(), timeout=timeout, return_when=FIRST_COMPLETED)
                else:
                    time.sleep(timeout)
                continue
            for out in engine.step():
                i = int(out.request_id.split("-")[1])
                rec = records[i]
                t = time.perf_counter()
                n = len(out.outputs[0].token_ids)
                k = n - seen[i]
                if k > 0:
                    if rec["ttft"] is None:
                        rec["ttft"] = t - start[i]
                        k -= 1
                    rec["itl"].extend([(t - last[i]) / max(k, 1)] * k)
                    seen[i], last[i] = n, t
                if out.finished:
                    rec["e2e"] = t - start[i]
                    rec["output_tokens"] = n
    finally:
        pool.shutdown(wait=True)
    summary = summarize(records, time.perf_counter() - t0)
    summary.update(_delta(counters(engine), before))
    return {"summary": summary, "records": records}


# -- the peer -------------------------------------------------------------------------------


def hf_peer(args: argparse.Namespace, cfg, tok, path: str, load: Load) -> dict:
    """transformers' batched generate on the burst's first --hf-prompts prompts."""
    try:
        import torch

        from benchmarks.vlm_throughput import hf_batch
        from benchmarks.vlm_ttft import build_hf
        from jaxmm.multimodal.media import load_image

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = build_hf(cfg, device)
    except (ImportError, AttributeError) as e:  # an older transformers: say which class
        return {"hf_skipped": f"transformers could not build the peer: {type(e).__name__}: {e}"}
    # the same images, decoded (a repeat is decoded and encoded again: HF keeps no cache)
    decoded = [load_image(u) for u in load.images]
    n = min(args.hf_prompts, len(load.offsets))
    prompts = [{"multi_modal_data": {"image": decoded[load.which[i]]}} for i in range(n)]
    out = hf_batch(model, tok, path, prompts, args.hf_batch, args.output_len, device)
    out["hf_device"] = str(device)
    out["hf_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    del model
    return out


# -- main -----------------------------------------------------------------------------------

SMOKE = [
    "--config", "small", "--sizes", "56", "84", "--request-rates", "50", "100", "200",
    "--num-requests", "3", "--burst", "4", "--output-len", "4", "--max-num-seqs", "4",
    "--max-num-batched-tokens", "64", "--no-warmup", "--hf-prompts", "2", "--hf-batch", "2",
    "--client-procs", "1", "--kv-cache-memory-bytes", str(1 << 24),
]  # fmt: skip


def _side(summary: dict) -> dict:
    """A summary with images/s (one image per request)."""
    d = summary["duration_s"]
    return {**summary, "images_per_s": round(summary["completed"] / d, 3) if d else None}


def load_line(load: Load, server: dict, offline: dict | None, server_recs, offline_recs) -> dict:
    r = {
        "benchmark": "vlm_serving",
        "load": load.name,
        "request_rate": "inf" if load.request_rate == float("inf") else load.request_rate,
        "num_requests": len(load.offsets),
        "distinct_images": len(load.images),
        "repeated_by_uuid": sum(load.repeat),
        "image_sizes": {str(s): load.sizes.count(s) for s in sorted(set(load.sizes))},
        "server": _side(server),
    }
    if offline is not None:
        r["offline"] = _side(offline)
        s, o = r["server"], r["offline"]
        if s["ttft_ms"]["p50"] is not None and o["ttft_ms"]["p50"] is not None:
            r["ttft_overhead_ms_p50"] = round(s["ttft_ms"]["p50"] - o["ttft_ms"]["p50"], 3)
        if s["images_per_s"] and o["images_per_s"]:
            r["images_per_s_ratio"] = round(s["images_per_s"] / o["images_per_s"], 3)
        if s["output_tokens_per_s"] and o["output_tokens_per_s"]:
            r["throughput_ratio"] = round(s["output_tokens_per_s"] / o["output_tokens_per_s"], 3)
        # both sides saw the same prompts: the same token counts, request by request
        pairs = [
            (a.get("prompt_tokens"), b.get("prompt_tokens"))
            for a, b in zip(server_recs, offline_recs, strict=True)
        ]
        r["prompt_tokens_match"] = all(a == b and a is not None for a, b in pairs)
    return r


def targets(lines: list[dict], hf: dict) -> dict:
    burst = lines[-1]
    low = min(lines[:-1], key=lambda x: x["request_rate"])
    out: dict = {}
    ratio = burst.get("images_per_s_ratio")
    out["http_vs_offline_at_saturation"] = {
        "value": ratio,
        "target": ">= 0.95",
        "met": None if ratio is None else ratio >= 0.95,
    }
    over = low.get("ttft_overhead_ms_p50")
    out["ttft_p50_overhead_ms_low_load"] = {
        "load": low["load"],
        "value": over,
        "target": "<= 5",
        "met": None if over is None else over <= 5.0,
    }
    hf_rate = hf.get("hf_images_per_s")
    x = round(burst["server"]["images_per_s"] / hf_rate, 2) if hf_rate else None
    out["images_per_s_vs_hf_at_saturation"] = {
        "value": x,
        "target": ">= 5",
        "met": None if x is None else x >= 5.0,
    }
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a tiny CPU run: the test's sizes")
    ap.add_argument("--config", default="qwen2-vl-2b", help="a vlm_ttft.CONFIGS name")
    ap.add_argument("--sizes", type=int, nargs=2, default=[448, 1344], help="small, large side")
    ap.add_argument("--mix", type=float, default=0.25, help="fraction of distinct images large")
    ap.add_argument("--repeat", type=float, default=0.3, help="fraction of requests repeating")
    ap.add_argument("--repeat-media", choices=["full", "none"], default="full")
    ap.add_argument("--image-format", choices=["mixed", "png", "jpeg"], default="mixed")
    ap.add_argument("--request-rates", type=float, nargs=3, default=[2.0, 8.0, 24.0])
    ap.add_argument("--num-requests", type=int, nargs="+", default=[24, 64, 128])
    ap.add_argument("--burst", type=int, default=256, help="requests sent at once")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--hf-prompts", type=int, default=32)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--device", default=None, help="torch device for transformers")
    ap.add_argument(
        "--mm-processor-workers",
        type=int,
        default=None,
        help="media worker processes (engine default)",
    )
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxmm-bench"))
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--smoke" in argv:  # the smoke sizes first: flags given after them win
        argv = SMOKE + argv
    args = ap.parse_args(argv)
    if len(args.num_requests) not in (1, 3):
        ap.error("--num-requests takes one count, or one per request rate")
    counts = args.num_requests * (3 // len(args.num_requests))
    opts = {"output_len": args.output_len, "repeat_media": args.repeat_media}
    opts["timeout"] = args.timeout

    from jaxmm.server.app import build_app

    path = os.path.join(args.workdir, f"vlm-{args.config}")
    cfg, tok = write_checkpoint(args.config, path)
    # the images are drawn and encoded on a thread while the engine starts
    from concurrent.futures import ThreadPoolExecutor

    maker = ThreadPoolExecutor(1)
    loads_ready = maker.submit(make_loads, args, counts)
    patch, merge = PREPROCESSOR["patch_size"], PREPROCESSOR["merge_size"]
    longest = (max(args.sizes) // patch) ** 2 // merge**2 + 64 + args.output_len
    kwargs = dict(
        model=path,
        dtype="bfloat16",
        max_model_len=max(1024, -(-longest // 1024) * 1024),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        load_format="dummy",
        warmup=args.warmup,
        mm_processor_workers=args.mm_processor_workers,
        mm_warmup_image_sizes=[f"{s}x{s}" for s in args.sizes] if args.warmup else None,
    )
    log("starting the engine")
    t0 = time.perf_counter()
    if args.engine_process:
        from jaxmm.engine.core_process import ProcessEngine
        from jaxmm.llm import engine_config

        client = ProcessEngine(engine_config(**kwargs))
        info = client.call(core_device)
        engine = None
    else:
        from jaxmm import LLM
        from jaxmm.engine.async_engine import AsyncEngine

        engine = LLM(**kwargs).llm_engine
        client = AsyncEngine(engine)
        info = core_device(engine)
    start_s = time.perf_counter() - t0
    model = "vlm"
    log(f"engine ready in {start_s:.1f} s")
    warm, loads = loads_ready.result()
    maker.shutdown()
    files = [os.path.join(args.workdir, f"vlm-serving-{load.name}.pkl") for load in loads]
    server = _Server(build_app(client, served_model_names=[model], model_path=path))
    clients = Clients(max(1, args.client_procs), server.url, model, opts)
    http, offline = [], []
    try:
        warm_recs, _, _ = clients.run(warm, os.path.join(args.workdir, "vlm-serving-warm.pkl"))
        bad = [r["error"] for r in warm_recs if r.get("error")]
        if bad:
            raise RuntimeError(f"the warmup requests failed: {bad}")
        for load, f in zip(loads, files, strict=True):
            log(f"HTTP {load.name}: {len(load.offsets)} requests")
            before = counters(engine) if engine is not None else client.call(counters)
            records, start, end = clients.run(load, f)
            summary = summarize(records, end - start)
            after = counters(engine) if engine is not None else client.call(counters)
            http.append(({**summary, **_delta(after, before)}, records))
        server.stop()
        if engine is None:  # in the core's process, by the engine there, after HTTP
            for load, f in zip(loads, files, strict=True):
                log(f"offline {load.name}")
                res = client.call(run_offline, opts, f)
                offline.append((res["summary"], res["records"]))
    finally:
        clients.close()
        server.stop()
        client.shutdown()
    if engine is not None:  # the same engine once its serving thread has stopped
        for load, f in zip(loads, files, strict=True):
            log(f"offline {load.name}")
            res = run_offline(engine, opts, f)
            offline.append((res["summary"], res["records"]))

    lines = [
        load_line(load, s, o, s_recs, o_recs)
        for load, (s, s_recs), (o, o_recs) in zip(loads, http, offline, strict=True)
    ]
    for r in lines:  # out before the peer runs: a failing peer loses none of them
        emit(r, args.out)
    hf: dict = {"hf_skipped": "--no-hf"}
    if not args.no_hf:
        log("transformers")
        try:
            hf = hf_peer(args, cfg, tok, path, loads[-1])
        except Exception as e:  # e.g. out of memory: the engine's numbers stand
            import traceback

            traceback.print_exc()
            hf = {"hf_skipped": f"the peer failed: {type(e).__name__}: {str(e)[:300]}"}

    import transformers

    import jaxmm

    summary = {
        "benchmark": "vlm_serving",
        "summary": True,
        "config": args.config,
        "image_sizes": list(args.sizes),
        "mix": args.mix,
        "repeat": args.repeat,
        "repeat_media": args.repeat_media,
        "image_format": args.image_format,
        "output_len": args.output_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "engine_process": args.engine_process,
        "client_procs": max(1, args.client_procs),
        "start_s": round(start_s, 1),
        "targets": targets(lines, hf),
        **hf,
        "limits": {
            "saturation": "the engine: max_num_seqs sequences and max_num_batched_tokens "
            "tokens per step, the encoder budget per step, and media preparation on the "
            "core's prepare threads and the media worker processes (mm_processor_workers)",
            "low_load_ttft": "one image's decode, processing, encoder and prefill; HTTP adds "
            "the request's JSON and base64 transfer, chat rendering, the hop to the core "
            "and SSE",
            "images_per_s": "one image per request: completed requests over the load's "
            "wall time, from the first scheduled arrival to the last response",
            "hf": "transformers' generate in batches of hf_batch padded to the longest "
            "prompt; no encoder or prefix cache, so repeats cost a full encode",
        },
        **info,
        "jaxmm_version": getattr(jaxmm, "__version__", None),
        "transformers_version": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import torch

        summary["torch_version"] = torch.__version__
    except ImportError:
        pass
    from jaxmm.multimodal.workers import default_num_workers

    w = args.mm_processor_workers
    summary["mm_processor_workers"] = default_num_workers() if w is None else w
    lines.append(summary)
    emit(summary, args.out)
    return lines


def emit(line: dict, out: str | None) -> None:
    """One JSON line on stdout (and appended to `out`)."""
    print(json.dumps(line), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
