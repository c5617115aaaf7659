"""Grammar-mask time per token on the host, for the grammar engines that are installed.

    python -m benchmarks.structured_mask [--tokenizer DIR]

Walks a valid JSON document of a 5-property schema token by token and times each
next-token mask (a (V/32,) int32 bitmask) and the grammar's compile time. The tokenizer is
SmolLM2's (the embedded default model's, 49,152 tokens) unless one is given. llguidance is
jaxmm's dependency; xgrammar and outlines-core are measured too when importable (they are
not dependencies: xgrammar needs torch and triton, outlines-core handles regexes only).
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "active"],
    "additionalProperties": False,
}
DOC = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.com",
    "tags": ["math", "engines", "poetry"],
    "active": True,
}


def _stats(compile_s: float, times: list[float]) -> dict:
    t = np.array(times) * 1e6
    return {
        "compile_ms": round(compile_s * 1e3, 2),
        "mask_us_mean": round(float(t.mean()), 1),
        "mask_us_p50": round(float(np.median(t)), 1),
        "mask_us_max": round(float(t.max()), 1),
    }


def bench_llguidance(hf, V: int, tokens: list[int], eos: int, reps: int) -> dict:
    import llguidance as llg
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    lt = llg.LLTokenizer(hf.backend_tokenizer.to_str(), n_vocab=V, eos_token=eos)
    t0 = time.perf_counter()
    grammar = llg.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False}
    )
    llg.LLMatcher(lt, grammar)
    compile_s = time.perf_counter() - t0
    mask = allocate_token_bitmask(1, V)
    times = []
    for _ in range(reps):  # the same (cached) grammar, as for a schema sent again
        m = llg.LLMatcher(lt, grammar)
        for t in tokens + [eos]:
            a = time.perf_counter()
            fill_next_token_bitmask(m, mask, 0)
            times.append(time.perf_counter() - a)
            assert (mask[0, t // 32] >> (t % 32)) & 1, "the document's token is not allowed"
            m.consume_token(t)
    return _stats(compile_s, times)


def bench_xgrammar(hf, V: int, tokens: list[int], eos: int, reps: int) -> dict:
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf, vocab_size=V))
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")
    )
    compile_s = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, V)
    times = []
    for _ in range(reps):
        m = xgr.GrammarMatcher(compiled)
        for t in tokens + [eos]:
            a = time.perf_counter()
            m.fill_next_token_bitmask(mask, 0)
            times.append(time.perf_counter() - a)
            m.accept_token(t)
    return _stats(compile_s, times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", help="a tokenizer directory (default: SmolLM2's)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.tokenizer:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from jaxmm.default_model import default_model_path
        from jaxmm.runner.checkpoint import load_tokenizer, open_checkpoint

        hf = load_tokenizer(open_checkpoint(default_model_path(), "auto"))
    V = len(hf)
    tokens = hf.encode(json.dumps(DOC, separators=(",", ":")), add_special_tokens=False)
    out = {
        "cpu": platform.processor() or platform.machine(),
        "vocab": V,
        "tokens_per_document": len(tokens) + 1,
    }
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        try:
            out[name] = fn(hf, V, tokens, hf.eos_token_id, args.reps)
        except ImportError:
            out[name] = "not installed"
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
