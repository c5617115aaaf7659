"""SmolLM2-135M-Instruct (embedded GGUF) decode speed on CPU: jaxmm vs transformers, same run.

    python benchmarks/cpu_smollm2.py [--batch-sizes 1 32] [--output-len 64]

Both load the same GGUF dequantized to float32; each generates `--output-len` tokens
(ignore EOS, greedy) for `batch` copies of a short prompt after one warm-up round.
Prints one JSON line per batch size with tokens/s for each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def bench_jaxmm(llm, ids, batch, n):
    from jaxmm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    prompts = [{"prompt_token_ids": ids}] * batch
    llm.generate(prompts, sp, use_tqdm=False)  # warm-up (compiles this batch's buckets)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / dt


def bench_hf(model, ids, batch, n):
    import torch

    x = torch.tensor([ids] * batch)
    kw = dict(
        attention_mask=torch.ones_like(x),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    with torch.no_grad():
        model.generate(x, **kw)
        t0 = time.perf_counter()
        y = model.generate(x, **kw)
    dt = time.perf_counter() - t0
    return (y.shape[1] - len(ids)) * batch / dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args(argv)

    import jax
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from jaxmm import LLM
    from jaxmm.default_model import default_model_path

    path = default_model_path()
    llm = LLM(path, dtype="float32", max_model_len=512)
    ids = llm.get_tokenizer()("The history of the city of Paris began").input_ids
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    results = []
    for b in args.batch_sizes:
        ours = bench_jaxmm(llm, ids, b, args.output_len)
        ref = bench_hf(hf, ids, b, args.output_len)
        r = {
            "benchmark": "cpu_smollm2_decode",
            "batch": b,
            "output_len": args.output_len,
            "jaxmm_tokens_per_s": round(ours, 2),
            "transformers_tokens_per_s": round(ref, 2),
            "speedup": round(ours / ref, 3),
            "cpu_count": os.cpu_count(),
            "jax_version": jax.__version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
        }
        print(json.dumps(r), flush=True)
        results.append(r)
    return results


if __name__ == "__main__":
    main()
