"""Multimodal embedding throughput: jaxmm `runner="pooling"` vs transformers, one GPU.

    python benchmarks/mm_embed.py                                        # GPU, 2B shape
    python benchmarks/mm_embed.py --config small --sizes 56 --num-prompts 4 \\
        --hf-batch 2 --max-num-batched-tokens 256                       # CPU smoke

DSE-Qwen2 style embeddings (the last token's final hidden state, L2-normalised) of prompts
that each hold one new image, on `vlm_ttft.write_checkpoint`'s random-weight Qwen2-VL-2B
shape (bf16). jaxmm: `LLM(runner="pooling", load_format="dummy")`, one untimed warm call,
then `embed` over N prompts (prompts packed into steps of --max-num-batched-tokens, images
encoded by the engine's encoder stage): embeddings/s and the XLA compilations the timed
call caused. transformers: the image processor + `model.model(...)` in batches of
--hf-batch, the last row of `last_hidden_state` normalised, after one untimed batch:
embeddings/s. Both sides are timed from images to vectors (preprocessing included). The
two models hold different random weights (jaxmm's are `dummy`), so their vectors are not
compared here; tests/engine/test_mm_embed.py checks agreement on shared weights. One JSON
line per image size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

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
    hf_inputs,
    write_checkpoint,
)

# a DSE-style document prompt: the image, then the end of text whose state is the vector
EMBED_PROMPT = PROMPT.split("<|im_start|>assistant")[0] + "<|endoftext|>"


def jaxmm_embed(llm, images: list) -> dict:
    from jaxmm.runner.model_runner import backend_compile_count

    prompts = [{"prompt": EMBED_PROMPT, "multi_modal_data": {"image": im}} for im in images]
    compiled = backend_compile_count()
    t0 = time.perf_counter()
    outs = llm.embed(prompts, use_tqdm=False)
    dt = time.perf_counter() - t0
    vectors = np.array([o.outputs.embedding for o in outs], np.float32)
    assert np.isfinite(vectors).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-2)
    return {
        "wall_s": round(dt, 3),
        "embeds_per_s": round(len(prompts) / dt, 2),
        "prompt_tokens": len(outs[0].prompt_token_ids),
        "compilations": backend_compile_count() - compiled,
    }


def hf_embed(model, path: str, tok, images: list, batch: int, device) -> dict:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(images), batch):
        parts = [hf_inputs(path, tok, im, device) for im in images[i : i + batch]]
        # same-size images: equal lengths, no padding; pixel rows follow one another
        inputs = {k: torch.cat([p[k] for p in parts]) for k in ("pixel_values", "image_grid_thw")}
        for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
            inputs[k] = torch.cat([p[k] for p in parts])
        with torch.inference_mode():
            last = model.model(**inputs).last_hidden_state[:, -1].float()
            vec = torch.nn.functional.normalize(last, dim=-1)
        n += len(vec)
    sync()
    dt = time.perf_counter() - t0
    return {"wall_s": round(dt, 3), "embeds_per_s": round(n / dt, 2)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="qwen2-vl-2b", choices=sorted(CONFIGS))
    ap.add_argument("--sizes", type=int, nargs="+", default=[448, 896])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=8)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--device", default=None, help="torch device for transformers (cuda / cpu)")
    ap.add_argument("--no-hf", action="store_true", help="time jaxmm only")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxmm-bench"))
    args = ap.parse_args(argv)

    import jax
    import torch
    import transformers

    from jaxmm import LLM

    path = os.path.join(args.workdir, f"vlm-{args.config}")
    cfg, tok = write_checkpoint(args.config, path)
    patch, merge = PREPROCESSOR["patch_size"], PREPROCESSOR["merge_size"]
    longest = max((s // patch) ** 2 // merge**2 for s in args.sizes) + 64
    max_len = max(1024, -(-longest // 1024) * 1024)
    budget = max(args.max_num_batched_tokens, max_len)
    llm = LLM(
        path,
        runner="pooling",
        dtype="bfloat16",
        max_model_len=max_len,
        max_num_batched_tokens=budget,
        kv_cache_memory_bytes=1 << 30,
        load_format="dummy",
    )
    runner = llm.pooling_engine.runner
    model = device = None
    if not args.no_hf:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = build_hf(cfg, device)

    images = Images(0)
    results = []
    for size in args.sizes:
        jaxmm_embed(llm, [images(size) for _ in range(args.num_prompts)])  # warm, untimed
        ours = jaxmm_embed(llm, [images(size) for _ in range(args.num_prompts)])
        r = {
            "benchmark": "mm_embed",
            "config": args.config,
            "image_size": [size, size],
            "num_prompts": args.num_prompts,
            "prompt_tokens": ours["prompt_tokens"],
            "warm": True,
            "jaxmm_wall_s": ours["wall_s"],
            "jaxmm_embeds_per_s": ours["embeds_per_s"],
            "jaxmm_compilations": ours["compilations"],
        }
        if model is not None:
            hf_embed(model, path, tok, [images(size)] * args.hf_batch, args.hf_batch, device)
            hf = hf_embed(
                model,
                path,
                tok,
                [images(size) for _ in range(args.num_prompts)],
                args.hf_batch,
                device,
            )
            r.update(
                hf_wall_s=hf["wall_s"],
                hf_embeds_per_s=hf["embeds_per_s"],
                hf_batch=args.hf_batch,
                speedup_vs_hf=round(ours["embeds_per_s"] / hf["embeds_per_s"], 3),
                hf_device=str(device),
                hf_attn_implementation=getattr(model.config, "_attn_implementation", None),
            )
        r.update(
            dtype=np.dtype(runner.dtype).name,
            attention_backend=runner.backend,
            max_num_batched_tokens=runner.max_num_batched_tokens,
            device=str(jax.devices()[0].device_kind),
            backend=jax.default_backend(),
            jax_version=jax.__version__,
            torch_version=torch.__version__,
            transformers_version=transformers.__version__,
            python=platform.python_version(),
        )
        print(json.dumps(r), flush=True)
        results.append(r)
    return results


if __name__ == "__main__":
    main()
