"""Parity with transformers on tiny random checkpoints: greedy tokens and logits, float32."""

import math

import numpy as np
import pytest
import torch

from jaxmm import LLM, SamplingParams
from jaxmm.runner.model_runner import SeqStep
from tests.helpers import hf_greedy, make_checkpoint

PROMPTS = [
    "Hello, my name is",
    "The capital of France is Paris. The capital of Italy",
    "JAX",
    "Once upon a time there was a small model that generated tokens one by one and",
    "The quick brown fox",
]
NEW_TOKENS = 16
ARCHS = ["llama", "llama_tied_llama3", "llama_linear", "qwen2", "qwen3", "mistral"]


def _prompt_ids(llm):
    tok = llm.get_tokenizer()
    return [tok(p).input_ids for p in PROMPTS]


def _generate(llm, ids):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _hf_last_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for i in ids:
            rows.append(model(torch.tensor([i])).logits[0, -1].numpy())
    return np.stack(rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_and_logits_match_transformers(ckpt_root, arch):
    path = make_checkpoint(ckpt_root, arch)
    llm = LLM(path, dtype="float32", max_model_len=256, max_num_batched_tokens=512)
    ids = _prompt_ids(llm)
    if arch == "mistral":  # exercise the sliding window (24) with a long prompt
        ids.append(ids[3] + ids[1])
    assert len({len(i) for i in ids}) >= 4
    ours = _generate(llm, ids)
    ref = hf_greedy(path, ids, NEW_TOKENS)
    assert ours == ref

    runner = llm.llm_engine.runner
    G = runner.block_size
    steps, page = [], runner.num_pages - 1
    for i in ids:  # scratch pages from the top of the pool; the engine is idle
        n = math.ceil(len(i) / G)
        steps.append(
            SeqStep(
                token_ids=i, start=0, block_table=list(range(page - n + 1, page + 1)), sample=True
            )
        )
        page -= n
    logits = runner.logits(steps)
    np.testing.assert_allclose(logits, _hf_last_logits(path, ids), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def llama(ckpt_root):
    return make_checkpoint(ckpt_root, "llama")


def test_chunked_prefill(llama):
    llm = LLM(llama, dtype="float32", max_model_len=256, max_num_batched_tokens=16)
    ids = _prompt_ids(llm)
    assert max(len(i) for i in ids) > 16  # prompts really are split in chunks
    assert _generate(llm, ids) == hf_greedy(llama, ids, NEW_TOKENS)


def test_preemption(llama):
    # 8 pages of 16 tokens for 5 sequences growing to ~40 tokens each: some must be preempted
    llm = LLM(
        llama,
        dtype="float32",
        max_model_len=128,
        num_gpu_blocks_override=8,
        max_num_batched_tokens=64,
    )
    ids = _prompt_ids(llm)
    ours = _generate(llm, ids)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert ours == hf_greedy(llama, ids, NEW_TOKENS)


def test_prefix_cache_hits(llama):
    llm = LLM(llama, dtype="float32", max_model_len=256, block_size=4)
    tok = llm.get_tokenizer()
    shared = tok(PROMPTS[3]).input_ids
    ids = [shared + tok(" and then").input_ids[1:], shared + tok(" but").input_ids[1:]]
    first = _generate(llm, ids[:1])
    bm = llm.llm_engine.block_manager
    hits_before = bm.prefix_hits
    second = _generate(llm, ids[1:])
    assert bm.prefix_hits - hits_before >= (len(shared) // 4 - 1) * 4
    assert first + second == hf_greedy(llama, ids, NEW_TOKENS)
