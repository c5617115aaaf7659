"""Batched multimodal throughput: jaxmm vs transformers, one random-weight Qwen2-VL, one GPU.

    python benchmarks/vlm_throughput.py                                   # GPU, 2B shape
    python benchmarks/vlm_throughput.py --config small --sizes 56 --num-prompts 8 \\
        --output-len 4 --max-num-batched-tokens 256 --hf-prompts 4       # CPU smoke

The checkpoint is `vlm_ttft.write_checkpoint`'s (Qwen2-VL-2B shape, random bf16 weights).
jaxmm: `LLM(max_num_seqs=64, max_num_batched_tokens=8192, enable_prefix_caching=False,
warmup=True, mm_warmup_image_sizes=--sizes)`, one 4-request warm batch, then per image
size:

  first   `generate` over N prompts, each with its own image (never seen before), output_len
          tokens each (ignore_eos): images/s, output tok/s and the XLA compilations it
          caused (`backend_compile_count`; the target is 0: warmup covers every program)
  steady  the same again with N new images: the engine's steady state
  tower   the vision tower alone on the steady batch's processed images, as the encoder
          stage calls it (batched, bucketed): the images/s the tower bounds throughput to

transformers: `model.generate` on the same prompts in batches of --hf-batch (left padding),
bf16 on the same GPU, timed after one untimed batch: images/s and output tok/s. One JSON
line per image size, with the device, the versions and what limits each number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

# jaxmm and torch share one GPU here: keep JAX from preallocating most of it
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.vlm_ttft import (  # noqa: E402
    CONFIGS,
    PREPROCESSOR,
    PROMPT,
    Images,
    build_hf,
    write_checkpoint,
)


def _prompts(images, size: int, n: int) -> list[dict]:
    return [{"prompt": PROMPT, "multi_modal_data": {"image": images(size)}} for _ in range(n)]


def jaxmm_batch(llm, prompts: list[dict], sp) -> dict:
    from jaxmm.runner.model_runner import backend_compile_count

    compiled = backend_compile_count()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "wall_s": round(dt, 3),
        "images_per_s": round(len(prompts) / dt, 2),
        "output_tok_per_s": round(tokens / dt, 1),
        "compilations": backend_compile_count() - compiled,
    }


def tower_rate(llm, prompts: list[dict], reps: int = 2) -> float:
    """Images/s of the vision tower alone, on these prompts' processed images, called the
    way the encoder stage calls it (the steps' encoder budget worth of items per call)."""
    import jax

    engine = llm.llm_engine
    runner = engine.runner
    fe = engine.mm_frontend()
    items = [fe.processor.image(p["multi_modal_data"]["image"], {}) for p in prompts]
    rows = sum(fe.model.mm_num_tokens("image", it) for it in items)
    budget = engine.scheduler.encoder_budget
    per_call = max(1, budget // max(1, rows // len(items)))
    if runner._mm_encode is None:
        runner._mm_encode = runner.model_obj.mm_encoder(runner.graphdef)
    best = float("inf")
    for _ in range(reps + 1):  # the first pass compiles what the batch has not
        t0 = time.perf_counter()
        for i in range(0, len(items), per_call):
            feats = runner._mm_encode(runner.params, "image", items[i : i + per_call])
            jax.block_until_ready([f.array for f in feats])
        best = min(best, time.perf_counter() - t0)
    return round(len(items) / best, 2)


def hf_batch(model, tok, path, prompts: list[dict], batch: int, output_len: int, device) -> dict:
    import torch
    from transformers import AutoImageProcessor

    ip = AutoImageProcessor.from_pretrained(path)
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")

    def inputs(chunk):
        out = ip(images=[p["multi_modal_data"]["image"] for p in chunk], return_tensors="pt")
        grids = out["image_grid_thw"]
        seqs = []
        for g in grids:
            n = int(g.prod()) // ip.merge_size**2
            seqs.append(tok(PROMPT.replace("<|image_pad|>", "<|image_pad|>" * n)).input_ids)
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding, as batched generation wants
            ids[i, L - len(s) :] = torch.tensor(s)
            mask[i, L - len(s) :] = 1
        return {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "mm_token_type_ids": (ids == image_id).long().to(device),
            "pixel_values": out["pixel_values"].to(device),
            "image_grid_thw": grids.to(device),
        }

    def run(chunk):
        x = inputs(chunk)
        with torch.inference_mode():
            out = model.generate(
                **x,
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                do_sample=False,
                pad_token_id=pad_id,
            )
        return (out.shape[1] - x["input_ids"].shape[1]) * len(chunk)

    run(prompts[:batch])  # untimed: CUDA / cuBLAS start-up
    torch.cuda.synchronize() if device.type == "cuda" else None
    t0 = time.perf_counter()
    tokens = sum(run(prompts[i : i + batch]) for i in range(0, len(prompts), batch))
    torch.cuda.synchronize() if device.type == "cuda" else None
    dt = time.perf_counter() - t0
    return {
        "hf_images_per_s": round(len(prompts) / dt, 2),
        "hf_output_tok_per_s": round(tokens / dt, 1),
        "hf_batch": batch,
        "hf_prompts": len(prompts),
    }


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="qwen2-vl-2b", choices=sorted(CONFIGS))
    ap.add_argument("--sizes", type=int, nargs="+", default=[448, 1344])
    ap.add_argument("--num-prompts", type=int, nargs="+", default=[128, 32])
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--hf-prompts", type=int, nargs="+", default=[64, 16])
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument(
        "--no-mm-warmup", action="store_true", help="no vision-encoder warmup for --sizes"
    )
    ap.add_argument("--device", default=None, help="torch device for transformers")
    ap.add_argument(
        "--mm-processor-workers",
        type=int,
        default=None,
        help="media worker processes (engine default)",
    )
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxmm-bench"))
    args = ap.parse_args(argv)
    num_prompts = dict(zip(args.sizes, args.num_prompts * len(args.sizes)))
    hf_prompts = dict(zip(args.sizes, args.hf_prompts * len(args.sizes)))

    import jax
    import torch
    import transformers

    from jaxmm import LLM, SamplingParams

    path = os.path.join(args.workdir, f"vlm-{args.config}")
    cfg, tok = write_checkpoint(args.config, path)
    patch, merge = PREPROCESSOR["patch_size"], PREPROCESSOR["merge_size"]
    longest = max((s // patch) ** 2 // merge**2 for s in args.sizes) + 64 + args.output_len
    max_len = max(1024, -(-longest // 1024) * 1024)
    t0 = time.perf_counter()
    from jaxmm.multimodal.workers import num_workers

    llm = LLM(
        path,
        dtype="bfloat16",
        max_model_len=max_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
        load_format="dummy",
        warmup=True,
        mm_processor_workers=args.mm_processor_workers,
        # the encoder programs for every batch of these sizes compile at start too
        mm_warmup_image_sizes=None if args.no_mm_warmup else [f"{s}x{s}" for s in args.sizes],
    )
    start_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    images = Images(0)
    warm = jaxmm_batch(llm, _prompts(images, args.sizes[0], 4), sp)

    model = device = None
    if not args.no_hf:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = build_hf(cfg, device)

    results = []
    for size in args.sizes:
        n = num_prompts[size]
        first = jaxmm_batch(llm, _prompts(images, size, n), sp)
        steady_prompts = _prompts(images, size, n)
        steady = jaxmm_batch(llm, steady_prompts, sp)
        tower = tower_rate(llm, steady_prompts)
        r = {
            "benchmark": "vlm_throughput",
            "config": args.config,
            "image_size": [size, size],
            "num_prompts": n,
            "output_len": args.output_len,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "prefix_caching": False,
            "start_s": round(start_s, 1),
            "warm_batch": warm,
            "first": first,
            "steady": steady,
            "first_vs_steady": round(first["images_per_s"] / steady["images_per_s"], 3),
            "tower_images_per_s": tower,
            "steady_vs_tower": round(steady["images_per_s"] / tower, 3),
        }
        if model is not None:
            hf = hf_batch(
                model,
                tok,
                path,
                steady_prompts[: hf_prompts[size]],
                args.hf_batch,
                args.output_len,
                device,
            )
            r.update(hf)
            r["speedup_vs_hf"] = round(steady["images_per_s"] / hf["hf_images_per_s"], 2)
        r.update(
            {
                "device": str(jax.devices()[0].device_kind),
                "backend": jax.default_backend(),
                "jax_version": jax.__version__,
                "transformers_version": transformers.__version__,
                "torch_version": torch.__version__,
                "python": platform.python_version(),
                "mm_processor_workers": num_workers(llm.llm_engine.config.multimodal),
            }
        )
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    return results


if __name__ == "__main__":
    main()
