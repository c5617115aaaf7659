"""A Qwen3-30B-A3B-shaped MoE model with random bf16 weights: batch-1 decode against the
active-weight roofline, offline throughput against the workload's physical bound, and HF
transformers on the same device in the same run as the peer.

    python benchmarks/moe_decode.py                                 # everything, H100
    python benchmarks/moe_decode.py --parts decode offline --impl ragged
    python benchmarks/moe_decode.py --smoke                         # tiny, CPU (tests)

Each part runs in its own process (jaxmm and torch each want the whole GPU, and the model
is 61 GB in bf16), one after the other; the JSON of all parts is printed as one object.

- decode (jaxmm): ms per output token of one stream (LLM.generate, from the difference of
  two output lengths so prefill cancels out) and the bare device step, against the
  active-weight roofline: the bytes one token touches (attention, norms, router, its k
  experts, the LM head) / the measured copy bandwidth. Issue 20's target: <= 1.3x.
- offline (jaxmm): --num-prompts x (--input-len in / --output-len out), random prompt ids,
  EOS ignored; against the physical bound: prefill FLOPs of the active parameters at the
  measured matmul rate, then for each decode step max(bytes, FLOPs) for the batch the KV
  pool holds, the bytes counting the experts a batch of B tokens touches on uniform
  routing, E (1 - (1 - k/E)^B) of them. Target: >= 60 % of the bound.
- hf: transformers' Qwen3MoeForCausalLM on the same config (random bf16 weights made on the
  device; experts through `--hf-experts`, grouped_mm by default where this transformers has
  it), batch-1 decode ms/token and offline tokens/s on the first --hf-num-prompts prompts
  (transformers' per-step cost makes the full 512 take too long for one run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = {
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        vocab_size=151936,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ),
    "tiny": dict(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        vocab_size=512,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        torch_dtype="float32",
    ),
}


def param_counts(cfg: dict) -> dict:
    """Parameters by role, for the roofline and the bound."""
    D, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    N, K, H = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    E, k, F = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    attn = D * (N + 2 * K) * H + N * H * D + 2 * H + 2 * D  # projections, q/k norms, norms
    sparse = [
        i not in cfg["mlp_only_layers"] and (i + 1) % cfg["decoder_sparse_step"] == 0
        for i in range(L)
    ]
    n_sparse = sum(sparse)
    dense_mlp = (L - n_sparse) * 3 * D * cfg["intermediate_size"]
    return dict(
        shared=L * attn + n_sparse * D * E + dense_mlp + V * D + D,  # + LM head, final norm
        expert=3 * D * F,  # one expert
        sparse_layers=n_sparse,
        E=E,
        k=k,
        total=L * attn + n_sparse * (D * E + E * 3 * D * F) + dense_mlp + 2 * V * D + D,
    )


def expected_experts(E: int, k: int, B: int) -> float:
    """Expected distinct experts B tokens touch in one layer, each choosing k of E uniformly."""
    return E * (1 - (1 - k / E) ** B)


def offline_bound_s(cfg, num_prompts, input_len, output_len, batch, flops, bw, nbytes) -> float:
    p = param_counts(cfg)
    L, N = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    K, H = cfg["num_key_value_heads"], cfg["head_dim"]
    active = p["shared"] + p["sparse_layers"] * p["k"] * p["expert"]
    t = 2 * active * num_prompts * input_len / flops
    t += num_prompts * L * 2 * N * H * input_len * input_len / flops  # causal attention
    waves = -(-num_prompts // batch)
    touched = p["sparse_layers"] * expected_experts(p["E"], p["k"], batch) * p["expert"]
    for step in range(output_len):
        ctx = input_len + step
        kv = batch * L * 2 * K * H * ctx * nbytes
        t_bytes = ((p["shared"] + touched) * nbytes + kv) / bw
        t_flops = (2 * active * batch + batch * L * 4 * N * H * ctx) / flops
        t += waves * max(t_bytes, t_flops)
    return t


def _run_part(part: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--part-only", part, "--config", args.config]
    names = ("num_prompts", "input_len", "output_len", "hf_num_prompts", "workdir", "max_num_seqs")
    for name in names:
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    cmd += ["--impl", args.impl, "--hf-experts", args.hf_experts]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(error=proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _llm(args, cfg, max_len: int, **kw):
    from benchmarks.throughput import write_config
    from jaxmm import LLM

    if args.impl != "auto":
        os.environ["JAXMM_MOE_IMPL"] = args.impl
    path = os.path.join(args.workdir, args.config)
    write_config(cfg, path)
    return LLM(
        path,
        dtype="auto",
        max_model_len=max_len,
        skip_tokenizer_init=True,
        load_format="dummy",
        warmup=True,
        **kw,
    )


def part_decode(args, cfg) -> dict:
    import jax

    from benchmarks.e2e_decode import copy_bandwidth, decode_tpot_ms
    from jaxmm.runner.model_runner import SeqStep

    llm = _llm(args, cfg, 1024, max_num_seqs=16, max_num_batched_tokens=32)
    runner = llm.llm_engine.runner
    nbytes = np.dtype(runner.dtype).itemsize
    p = param_counts(cfg)
    active_bytes = (p["shared"] + p["sparse_layers"] * p["k"] * p["expert"]) * nbytes
    bw = copy_bandwidth(1 << 30 if jax.default_backend() != "cpu" else 1 << 24)
    roofline_ms = active_bytes / bw * 1e3
    short, long = (4, 12) if args.config == "tiny" else (32, 160)
    tpot_ms = decode_tpot_ms(llm, short, long, warm_long=False)

    # the step alone: decode steps of a 100-token context (step + sampler) launched back
    # to back before any is read, so host preparation overlaps the device
    step = SeqStep(token_ids=[5], start=99, block_table=list(range(7)), sample=True)
    runner.execute([step])
    n_dev = 20
    t0 = time.perf_counter()
    flights = [runner.dispatch([step]) for _ in range(n_dev)]
    for f in flights:
        runner.resolve(f)
    device_ms = (time.perf_counter() - t0) / n_dev * 1e3
    return dict(
        active_weight_bytes=int(active_bytes),
        total_weight_bytes=int(sum(x.nbytes for x in jax.tree_util.tree_leaves(runner.params))),
        copy_bandwidth_GBps=round(bw / 1e9, 1),
        roofline_ms_per_token=round(roofline_ms, 3),
        engine_ms_per_token=round(float(tpot_ms), 3),
        engine_vs_roofline=round(float(tpot_ms) / roofline_ms, 3),
        pipelined_step_ms=round(device_ms, 3),
        pipelined_step_vs_roofline=round(device_ms / roofline_ms, 3),
        moe_impl=args.impl,
        device=str(jax.devices()[0].device_kind),
        jax_version=jax.__version__,
        token_bucket_of_decode=runner.bucket(1)[0],
        attention_backend=runner.backend,
        init_times_s=runner.init_times,
    )


def part_offline(args, cfg) -> dict:
    import jax

    from benchmarks.throughput import device_rates
    from jaxmm import SamplingParams
    from jaxmm.runner.model_runner import backend_compile_count

    llm = _llm(args, cfg, args.input_len + args.output_len, max_num_seqs=args.max_num_seqs)
    runner = llm.llm_engine.runner
    rng = np.random.default_rng(0)
    V = cfg["vocab_size"]
    prompts = [
        {"prompt_token_ids": rng.integers(0, V, args.input_len).tolist()}
        for _ in range(args.num_prompts)
    ]
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], sp, use_tqdm=False)
    compiles = backend_compile_count()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    compiles = backend_compile_count() - compiles  # before device_rates compiles its own
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    flops, bw = device_rates(reps=5 if args.config != "tiny" else 1)
    # concurrent sequences the KV pool holds for this workload (and the scheduler allows)
    per_seq_pages = -(-(args.input_len + args.output_len) // runner.block_size)
    batch = max(1, min(args.num_prompts, runner.max_num_seqs, runner.num_pages // per_seq_pages))
    nbytes = np.dtype(runner.dtype).itemsize
    bound = offline_bound_s(
        cfg, args.num_prompts, args.input_len, args.output_len, batch, flops, bw, nbytes
    )
    return dict(
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        elapsed_s=round(elapsed, 3),
        output_tokens_per_s=round(out_tokens / elapsed, 2),
        compiles_during_run=compiles,
        kv_pool_batch=batch,
        matmul_TFLOPs=round(flops / 1e12, 1),
        copy_bandwidth_GBps=round(bw / 1e9, 1),
        bound_s=round(bound, 3),
        fraction_of_bound=round(bound / elapsed, 3),
        moe_impl=args.impl,
        device=str(jax.devices()[0].device_kind),
        jax_version=jax.__version__,
    )


def part_hf(args, cfg) -> dict:
    import torch
    import transformers

    if not hasattr(transformers, "Qwen3MoeForCausalLM"):
        return dict(error=f"transformers {transformers.__version__} has no Qwen3MoeForCausalLM")
    kw = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    config = transformers.Qwen3MoeConfig(**kw)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    experts = args.hf_experts
    if experts != "eager":
        try:
            from transformers.integrations import moe as hf_moe

            table = getattr(getattr(hf_moe, "ExpertsInterface", None), "_global_mapping", {})
        except ImportError:  # a transformers without selectable experts implementations
            table = {}
        if experts not in table:
            experts = "eager"
    config._experts_implementation = experts
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # made in bf16 directly: 61 GB, not 122 in float32 first
    with torch.device(device):
        model = transformers.Qwen3MoeForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    short, long = (4, 12) if args.config == "tiny" else (32, 160)
    g = torch.Generator().manual_seed(0)

    def gen(x, n):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(
                x.to(device),
                attention_mask=torch.ones_like(x).to(device),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    one = torch.randint(0, config.vocab_size, (1, 16), generator=g)
    gen(one, short)
    shorts = [gen(one, short) for _ in range(2)]
    longs = [gen(one, long) for _ in range(2)]
    tpot_ms = (np.median(longs) - np.median(shorts)) / (long - short) * 1e3

    n = min(args.hf_num_prompts, args.num_prompts)
    prompts = torch.randint(0, config.vocab_size, (n, args.input_len), generator=g)
    batch = 64
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        gen(prompts[i : i + batch], args.output_len)
    elapsed = time.perf_counter() - t0
    return dict(
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
        experts_implementation=experts,
        engine_ms_per_token=round(float(tpot_ms), 3),
        offline_num_prompts=n,
        offline_batch=batch,
        offline_output_tokens_per_s=round(n * args.output_len / elapsed, 2),
    )


PARTS = {"decode": part_decode, "offline": part_offline, "hf": part_hf}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="qwen3-30b-a3b", choices=sorted(CONFIGS))
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--part-only", choices=list(PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--hf-num-prompts", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256, help="jaxmm offline batch cap")
    ap.add_argument("--impl", default="auto", help="layers/moe.py implementation for jaxmm")
    ap.add_argument("--hf-experts", default="grouped_mm", help="eager, batched_mm, grouped_mm")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxmm-bench"))
    ap.add_argument("--smoke", action="store_true", help="tiny config and workload, CPU")
    args = ap.parse_args(argv)
    if args.smoke:
        args.config, args.num_prompts, args.input_len, args.output_len = "tiny", 4, 16, 8
        args.hf_num_prompts = 2
    cfg = CONFIGS[args.config]
    if args.part_only:
        result = PARTS[args.part_only](args, cfg)
        print(json.dumps(result), flush=True)
        return result

    # no JAX in this process: it would hold the accelerator's memory while the parts run
    result = {"benchmark": "moe_decode", "config": args.config, "date": time.strftime("%Y-%m-%d")}
    for part in args.parts:
        result[part] = _run_part(part, args)
        print(json.dumps({part: result[part]}), file=sys.stderr, flush=True)
        for key in ("device", "jax_version"):
            result.setdefault(key, result[part].get(key))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
