"""What the time-to-first-token benchmarks share: their common flags, the random-weight engine,
the transformers peer (built, timed around one `generate` of one token), the warm-then-timed
rounds, the median fields and the environment fields of each JSON line.

Importing this module first sets the environment every script wants before JAX or tokenizers
start: jaxmm and torch share one GPU (JAX must not preallocate most of it), no hub access.
Each script keeps its own checkpoint writer, inputs and JSON line; the keys it writes are
still its own (the helpers here take flags for the fields a script does or does not write).
"""

from __future__ import annotations

import os

# jaxmm and torch share one GPU here: keep JAX from preallocating most of it
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

# what an older transformers raises for a class, a processor or an argument it lacks
HF_ERRORS = (AttributeError, ImportError, OSError, TypeError, ValueError)


def median(xs: Sequence[float]) -> float:
    return round(float(np.median(xs)), 4)


def medians(rows: Sequence[dict], keys: Sequence[str]) -> dict:
    """{key: median of rows[*][key]} for each key."""
    return {k: median([x[k] for x in rows]) for k in keys}


# ---------------------------------------------------------------------------------------
# flags, jaxmm


def add_common_args(ap: argparse.ArgumentParser, max_num_batched_tokens: int | None = None,
                    attention_backend: bool = True) -> None:  # fmt: skip
    """--iters, --device, --no-hf, then --max-num-batched-tokens (where a default is given)
    and --attention-backend (where the script exposes it)."""
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default=None, help="torch device for transformers (cuda / cpu)")
    ap.add_argument("--no-hf", action="store_true", help="time jaxmm only")
    if max_num_batched_tokens is not None:
        ap.add_argument("--max-num-batched-tokens", type=int, default=max_num_batched_tokens)
    if attention_backend:
        ap.add_argument("--attention-backend", default="auto")


def add_workdir_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxmm-bench"))


def dummy_llm(
    path: str, max_model_len: int, max_num_batched_tokens: int, kv_bytes: int = 1 << 30, **kw
):
    """jaxmm on `path` with random bf16 weights, prefix caching off (every run misses)."""
    from jaxmm import LLM

    return LLM(
        path,
        dtype="bfloat16",
        max_model_len=max_model_len,
        max_num_seqs=4,
        max_num_batched_tokens=max_num_batched_tokens,
        kv_cache_memory_bytes=kv_bytes,
        enable_prefix_caching=False,
        load_format="dummy",
        **kw,
    )


def first_token():
    """Sampling of one greedy token that no EOS stops: a TTFT run's whole output."""
    from jaxmm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def error_line(benchmark: str, config: str, error: str) -> list[dict]:
    """The one JSON line of a run that cannot happen (e.g. a transformers without the model)."""
    r = {"benchmark": benchmark, "config": config, "error": error}
    print(json.dumps(r), flush=True)
    return [r]


def sync_rows(rows) -> None:
    """Wait for encoder rows (device arrays, or `DeviceRows` views of one) to be computed."""
    import jax

    jax.block_until_ready([getattr(r, "array", r) for r in rows])


def prefill_s(engine, text: str, ids: list[int], mm, sp) -> float:
    """Seconds of engine steps from a prepared request (`prepare_*_prompt`'s text, ids and
    multimodal items) to its first token. Its items' encoder runs are done ahead, untimed:
    they are not prefill."""
    engine.reset_mm_cache()
    runner = engine.runner
    for it in getattr(mm, "items", ()):
        entry = engine.encoder_cache.allocate(it.cache_key, it.end - it.start, "bench")
        runner.encode([(it.modality, it.data, entry.rows)])
        entry.ready = True
        engine.encoder_cache.release(it.cache_key, "bench")
    sync_rows([runner.encoder_cache])
    rid = engine.next_request_id()
    engine.add_request(rid, text, sp, prompt_ids=ids, mm=mm)
    t0 = time.perf_counter()
    first = None
    while first is None:
        for out in engine.step():
            if out.request_id == rid and out.outputs[0].token_ids:
                first = out
    t1 = time.perf_counter()
    while engine.has_unfinished_requests():  # max_tokens=1: already done
        engine.step()
    return t1 - t0


def generate_one_s(llm, request: dict, sp) -> float:
    """Wall time of `llm.generate` of one request to one token: jaxmm's end-to-end TTFT."""
    t0 = time.perf_counter()
    outs = llm.generate([request], sp, use_tqdm=False)
    t1 = time.perf_counter()
    assert len(outs[0].outputs[0].token_ids) == 1
    return t1 - t0


# ---------------------------------------------------------------------------------------
# transformers


def torch_device(name: str | None):
    """--device, else CUDA where there is one."""
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def build_hf(model_cls, cfg, device):
    """`model_cls(cfg)` with random bf16 weights made on `device` (seeded), in eval mode."""
    import torch

    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls._from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def try_hf(build: Callable[[], Any]) -> tuple[Any, str | None]:
    """(build(), None), or (None, why) where this transformers lacks what it needs."""
    import transformers

    try:
        return build(), None
    except HF_ERRORS as e:
        return None, f"transformers {transformers.__version__}: {type(e).__name__}: {e}"


def cuda_sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def hf_generate_timed(model, device, make_inputs: Callable[[], dict]) -> dict:
    """transformers' side of one TTFT run: `make_inputs()` (its processor, the copy to the
    device) and `generate` of one token, each synchronised and timed."""
    import torch

    cuda_sync(device)
    t0 = time.perf_counter()
    inputs = make_inputs()
    cuda_sync(device)
    t1 = time.perf_counter()
    with torch.inference_mode():
        gen = model.generate(
            **inputs, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    cuda_sync(device)
    t2 = time.perf_counter()
    prompt = inputs["input_ids"].shape[1]
    assert gen.shape[1] == prompt + 1
    return {"hf_processor_s": t1 - t0, "hf_model_s": t2 - t1, "hf_prompt_tokens": int(prompt)}


def hf_processor_run(model, processor, device, prompt: str, bf16: str, **media) -> dict:
    """`hf_generate_timed` with the inputs from `processor(text=prompt, **media)` (e.g.
    images=[img], audio=[clip]), all moved to `device` and the `bf16` one cast to bfloat16."""
    import torch

    def make_inputs() -> dict:
        out = processor(text=prompt, **media, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in out.items() if hasattr(v, "to")}
        inputs[bf16] = inputs[bf16].to(torch.bfloat16)
        return inputs

    return hf_generate_timed(model, device, make_inputs)


# ---------------------------------------------------------------------------------------
# rounds and fields


def time_rounds(iters: int, *runs: Callable[[int], Any] | None) -> tuple[list, list[list]]:
    """Each run once untimed (compilation, CUDA start-up), then `iters` rounds of them in
    order; a run gets its round (0 for the warm one) and makes its own fresh input, so no
    cache serves it. None stands for a run left out (e.g. no transformers peer). Returns
    (the warm results, each run's timed results)."""
    warm = [run(0) if run is not None else None for run in runs]
    timed: list[list] = [[] for _ in runs]
    for i in range(1, iters + 1):
        for run, out in zip(runs, timed):
            if run is not None:
                out.append(run(i))
    return warm, timed


def ttft_fields(runs: Sequence[dict], e2e: Sequence[float]) -> dict:
    """Medians of jaxmm's pieces (`vlm_ttft.jaxmm_run`) and of the end-to-end call, and the
    rest of the end-to-end time (hashing, tokenizing, placement)."""
    r = medians(runs, ("preprocess_s", "encoder_s", "prefill_s"))
    r["e2e_s"] = median(e2e)
    parts = r["preprocess_s"] + r["encoder_s"] + r["prefill_s"]
    r["other_s"] = round(r["e2e_s"] - parts, 4)
    return r


def hf_fields(hf: Sequence[dict], e2e_s: float, device, model=None) -> dict:
    """Medians of transformers' pieces, the speedup of jaxmm's `e2e_s` over them, the device;
    with `model`, its attention implementation."""
    r = medians(hf, ("hf_processor_s", "hf_model_s"))
    r["hf_e2e_s"] = median([x["hf_processor_s"] + x["hf_model_s"] for x in hf])
    r["speedup_vs_hf"] = round(r["hf_e2e_s"] / e2e_s, 3)
    r["hf_device"] = str(device)
    if model is not None:
        r["hf_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    return r


def env_fields(runner=None, *, batched_tokens: bool = True, jaxmm_version: bool = False,
               python: bool = True, **extra) -> dict:  # fmt: skip
    """The run's setting: the engine's dtype, attention backend and step budget (with
    `runner`), `extra` fields, the device and the library versions, the date."""
    import jax
    import torch
    import transformers

    r: dict = {}
    if runner is not None:
        r["dtype"] = np.dtype(runner.dtype).name
        r["attention_backend"] = runner.backend
        if batched_tokens:
            r["max_num_batched_tokens"] = runner.max_num_batched_tokens
    r.update(extra)
    r["device"] = str(jax.devices()[0].device_kind)
    r["backend"] = jax.default_backend()
    r["jax_version"] = jax.__version__
    if jaxmm_version:
        import jaxmm

        r["jaxmm_version"] = getattr(jaxmm, "__version__", None)
    r["torch_version"] = torch.__version__
    r["transformers_version"] = transformers.__version__
    if python:
        r["python"] = platform.python_version()
    r["date"] = time.strftime("%Y-%m-%d")
    return r
