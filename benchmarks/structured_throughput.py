"""Offline throughput with structured outputs (JSON schema) against unconstrained requests.

    python benchmarks/structured_throughput.py --config llama-3.1-8b --num-prompts 256 \\
        --input-len 512 --output-len 256 --max-num-seqs 64 --tokenizer DIR --out FILE
    python benchmarks/structured_throughput.py --config tiny --num-prompts 8 \\
        --input-len 32 --output-len 16 --max-num-seqs 8                       # CPU smoke

A random-weight model of a config shape (throughput.py's CONFIGS and config-only checkpoint,
`load_format="dummy"`), random token prompts, greedy, `ignore_eos`, one `LLM.generate` per
case, all in one process:

  unconstrained  every request free
  json_schema    every request under SCHEMA (`SamplingParams(structured_outputs=...)`)
  mixed          --mixed-fraction of the requests (evenly spread) under SCHEMA, the rest free

Each case runs one untimed warm batch (max_num_seqs prompts, full output length) first, so
the masked sampler variant is compiled and the grammar cached before the timed batch.

SCHEMA: an object with a string (maxLength 48), an enum, a bounded number and an array of
--min-items or more objects (string maxLength 24, enum, bounded integer). A random-weight
model fills the strings and the array keeps going, so a constrained request writes its full
--output-len tokens and the cases compare the same work. Output tok/s counts the tokens
actually produced; the JSON line gives, as {tokens: requests}, each constrained request's
output length (`constrained_output_tokens`) and its document's (`constrained_document_tokens`:
up to the grammar's end, where a finished grammar allows only EOS and `ignore_eos` keeps the
request going with EOS tokens until max_tokens, so a short document would make masks look
cheap), and how many documents the grammar accepts (`constrained_outputs_valid`).

Grammar masks need a tokenizer: --tokenizer DIR (a Hugging Face tokenizer directory), or by
default the embedded SmolLM2's (49,152 tokens), saved under --workdir. Where the model's
vocabulary is larger (128,256 for the 8B shape) the ids past the tokenizer's are never
allowed by a mask; a smaller config vocabulary (tiny) is raised to the tokenizer's size.

Mask time: the engine's per-step mask computation (`fill_bitmasks`, called from the mask
callback the runner runs on the host after launching the step's model) is wrapped with a
timer; the JSON line gives its total, per-step mean and p99 over the steps that computed
masks, and its fraction of wall time; `advance_s` is the time spent feeding sampled tokens to
the grammars (`Matcher.advance`). Engine behaviour is unchanged.
One JSON line per case; --out FILE appends them to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.throughput import CONFIGS, write_config  # noqa: E402

ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "qty": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["name", "kind", "qty"],
    "additionalProperties": False,
}


def schema(min_items: int) -> dict:
    """The benchmark's JSON schema; `min_items` array items keep a document from closing
    early (each item is ~10 tokens or more)."""
    return {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 48},
            "status": {"enum": ["draft", "review", "published", "archived"]},
            "score": {"type": "number", "minimum": 0, "maximum": 100},
            "items": {"type": "array", "minItems": min_items, "items": ITEM},
        },
        "required": ["title", "status", "score", "items"],
        "additionalProperties": False,
    }


def tokenizer_dir(arg: str | None, workdir: str) -> str:
    """--tokenizer, or the embedded SmolLM2 tokenizer saved once under the workdir."""
    if arg:
        return arg
    path = os.path.join(workdir, "tokenizer-smollm2")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        from jaxmm.default_model import default_model_path
        from jaxmm.runner.checkpoint import load_tokenizer, open_checkpoint

        load_tokenizer(open_checkpoint(default_model_path(), "auto")).save_pretrained(path)
    return path


class MaskTimer:
    """Times the engine's grammar work without changing it: each step's mask callback (one
    call fills every constrained row of the step) and each `Matcher.advance`."""

    def __init__(self, engine):
        from jaxmm.engine.structured import Matcher

        self.step_s: list[float] = []  # one entry per step that computed masks
        self.rows = 0
        self.advance_s = 0.0
        self.steps = 0  # every dispatched step
        import jaxmm.engine.llm_engine as engine_module

        dispatch = engine.runner.dispatch
        self._module, self._fill = engine_module, engine_module.fill_bitmasks

        def timed_fill(rows, bitmask) -> None:
            # the mask computation only: the callback around it also waits for the previous
            # step's tokens (overlapping this step's model), which is not grammar work
            t0 = time.perf_counter()
            self._fill(rows, bitmask)
            self.step_s.append(time.perf_counter() - t0)
            self.rows += len(rows)

        def counted_dispatch(*args, **kwargs):
            self.steps += 1
            return dispatch(*args, **kwargs)

        # the engine module's name and this runner's instance attribute: nothing else changes
        engine_module.fill_bitmasks = timed_fill
        engine.runner.dispatch = counted_dispatch
        self._cls, self._advance = Matcher, Matcher.advance

        def timed_advance(matcher, token: int) -> bool:
            t0 = time.perf_counter()
            ok = self._advance(matcher, token)
            self.advance_s += time.perf_counter() - t0
            return ok

        Matcher.advance = timed_advance

    def close(self) -> None:
        self._cls.advance = self._advance
        self._module.fill_bitmasks = self._fill

    def reset(self) -> None:
        self.step_s, self.rows, self.advance_s, self.steps = [], 0, 0.0, 0

    def summary(self, wall_s: float) -> dict:
        t = np.array(self.step_s)
        total = float(t.sum()) if len(t) else 0.0
        return {
            "engine_steps": self.steps,
            "mask_steps": len(t),
            "mask_rows": self.rows,
            "mask_total_s": round(total, 4),
            "mask_per_step_mean_ms": round(float(t.mean()) * 1e3, 3) if len(t) else 0.0,
            "mask_per_step_p99_ms": round(float(np.percentile(t, 99)) * 1e3, 3) if len(t) else 0.0,
            "mask_per_row_mean_us": round(total / self.rows * 1e6, 1) if self.rows else 0.0,
            "mask_fraction_of_wall": round(total / wall_s, 4),
            "advance_s": round(self.advance_s, 4),
        }


def _constrained_ids(n: int, fraction: float) -> set[int]:
    """round(n * fraction) request indices, evenly spread over the batch."""
    k = round(n * fraction)
    return {int(i) for i in np.linspace(0, n, k, endpoint=False)} if k else set()


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="tiny", help=f"one of {sorted(CONFIGS)} or a config.json")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--mixed-fraction", type=float, default=0.1)
    ap.add_argument("--min-items", type=int, default=32, help="the schema's array minItems")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the embedded SmolLM2's)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxmm-bench"))
    ap.add_argument("--out", help="append the JSON lines to this file")
    args = ap.parse_args(argv)

    import jax
    import llguidance
    import transformers

    from jaxmm import LLM, SamplingParams
    from jaxmm.runner.model_runner import backend_compile_count
    from jaxmm.sampling_params import StructuredOutputsParams

    if args.config in CONFIGS:
        cfg, name = dict(CONFIGS[args.config]), args.config
    else:
        with open(args.config) as f:
            cfg, name = json.load(f), os.path.basename(args.config)
    tok_path = tokenizer_dir(args.tokenizer, args.workdir)
    tok = transformers.AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
    # every token id the tokenizer knows must be a row of the model's vocabulary
    cfg["vocab_size"] = max(cfg["vocab_size"], len(tok))
    path = os.path.join(args.workdir, f"{name}-structured")
    write_config(cfg, path)
    llm = LLM(
        path,
        tokenizer=tok_path,
        dtype=args.dtype,
        max_model_len=args.input_len + args.output_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        load_format="dummy",
        warmup=True,
    )
    engine = llm.llm_engine
    timer = MaskTimer(engine)
    eos = set(engine.eos_token_ids)
    rng = np.random.default_rng(0)
    V = cfg["vocab_size"]
    sch = schema(args.min_items)
    free = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    so = StructuredOutputsParams(json=sch)
    constrained = SamplingParams(
        temperature=0, max_tokens=args.output_len, ignore_eos=True, structured_outputs=so
    )
    cases = {
        "unconstrained": 0.0,
        "json_schema": 1.0,
        f"mixed_{round(args.mixed_fraction * 100)}pct": args.mixed_fraction,
    }

    def batch(n: int, fraction: float):
        prompts = [
            {"prompt_token_ids": rng.integers(0, V, args.input_len).tolist()} for _ in range(n)
        ]
        ids = _constrained_ids(n, fraction)
        return prompts, [constrained if i in ids else free for i in range(n)], ids

    results = []
    base_tps = None
    try:
        for case, fraction in cases.items():
            c0 = backend_compile_count()
            warm = min(args.num_prompts, args.max_num_seqs)
            llm.generate(*batch(warm, fraction)[:2], use_tqdm=False)  # untimed
            warm_compiles = backend_compile_count() - c0
            prompts, params, ids = batch(args.num_prompts, fraction)
            llm.reset_prefix_cache()
            timer.reset()
            c1 = backend_compile_count()
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            compiles = backend_compile_count() - c1
            out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            tps = out_tokens / wall
            if base_tps is None:
                base_tps = tps
            lens, docs, valid = Counter(), Counter(), 0
            for i in ids:
                toks = list(outs[i].outputs[0].token_ids)
                lens[len(toks)] += 1
                # past its document's end a grammar allows only EOS, and ignore_eos keeps
                # the request going: the document is the tokens up to the first EOS
                end = next((j + 1 for j, t in enumerate(toks) if t in eos), len(toks))
                docs[end] += 1
                # the document (or, cut by max_tokens, its prefix) is one the grammar accepts
                valid += engine.grammars().matcher(so).m.validate_tokens(toks[:end]) == end
            result = {
                "benchmark": "structured_throughput",
                "case": case,
                "config": name,
                "num_prompts": args.num_prompts,
                "constrained_requests": len(ids),
                "input_len": args.input_len,
                "output_len": args.output_len,
                "max_num_seqs": args.max_num_seqs,
                "elapsed_s": round(wall, 3),
                "output_tokens": out_tokens,
                "output_tokens_per_s": round(tps, 2),
                "loss_vs_unconstrained_pct": round((1 - tps / base_tps) * 100, 2),
                "constrained_output_tokens": {str(k): v for k, v in sorted(lens.items())},
                "constrained_document_tokens": {str(k): v for k, v in sorted(docs.items())},
                "constrained_outputs_valid": valid,
                **timer.summary(wall),
                "warm_batch": warm,
                "warm_compiles": warm_compiles,
                "compiles_during_run": compiles,
                "sampling": "greedy, ignore_eos",
                "schema": sch,
                "schema_note": (
                    f"object: string maxLength 48, enum, number 0-100, array of >= "
                    f"{args.min_items} objects (string maxLength 24, enum, integer 0-999); "
                    "the array outlasts output_len, so constrained requests run to max_tokens"
                ),
                "tokenizer": os.path.basename(os.path.normpath(tok_path)),
                "tokenizer_vocab": len(tok),
                "model_vocab": V,
                "dtype": np.dtype(engine.runner.dtype).name,
                "device": str(jax.devices()[0].device_kind),
                "backend": jax.default_backend(),
                "jax_version": jax.__version__,
                "transformers_version": transformers.__version__,
                "llguidance_version": llguidance.__version__,
                "python": platform.python_version(),
            }
            results.append(result)
            line = json.dumps(result)
            print(line)
            sys.stdout.flush()
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    finally:
        timer.close()
    return results


if __name__ == "__main__":
    main()
