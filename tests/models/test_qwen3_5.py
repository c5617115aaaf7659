"""Qwen3.5 (hybrid Gated DeltaNet + full attention) against transformers' PyTorch path.

Float32, tiny random weights: exact greedy tokens and last-token logits within 1e-4, with
prompts longer than one WY chunk, chunked prefill at an odd budget, preemption in a tiny KV
pool, n=2, a repeated prompt with prefix caching on, and no compilation after warmup.
"""

import math
import os

import numpy as np
import pytest
import torch

from jaxmm import LLM, SamplingParams
from jaxmm.runner.model_runner import SeqStep, backend_compile_count
from tests.helpers import hf_greedy, make_tokenizer

PROMPTS = [
    "Hello, my name is",
    "The capital of France is Paris. The capital of Italy",
    "JAX",
    "Once upon a time there was a small model that generated tokens one by one and",
    "The quick brown fox",
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def path(ckpt_root):
    import transformers

    path = os.path.join(ckpt_root, "qwen3_5")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(path)
    cfg = transformers.Qwen3_5TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3_5ForCausalLM(cfg)
    with torch.no_grad():  # larger than default, so greedy paths are not decided by ties
        for name, p in model.named_parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.3)
            if name.endswith("A_log"):
                p.uniform_(-1.0, 1.0)
    model.eval()
    model.save_pretrained(path)
    return path


def _ids(tok):
    ids = [tok(p).input_ids for p in PROMPTS]
    ids.append(ids[3] + ids[1] + ids[3])  # longer than one 64-token chunk of the WY form
    return ids


def _generate(llm, ids, n=1):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, n=n)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_greedy_and_logits_match_transformers(path):
    from transformers import AutoModelForCausalLM

    llm = LLM(path, dtype="float32", max_model_len=256, max_num_batched_tokens=512)
    ids = _ids(llm.get_tokenizer())
    assert len(ids[-1]) > 64
    ref = hf_greedy(path, ids, NEW_TOKENS)
    assert [o[0] for o in _generate(llm, ids)] == ref

    runner = llm.llm_engine.runner
    G, page, steps = runner.block_size, runner.num_pages - 1, []
    for i in ids:  # scratch pages from the top of the pool; the engine is idle
        n = math.ceil(len(i) / G)
        table = list(range(page - n + 1, page + 1))
        steps.append(SeqStep(token_ids=i, start=0, block_table=table, sample=True))
        page -= n
    logits = runner.logits(steps)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = np.stack([model(torch.tensor([i])).logits[0, -1].numpy() for i in ids])
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)


def test_chunked_preempted_n2_and_prefix_cache_without_recompiles(path):
    # 13-token budget: prompts split in odd chunks carrying the state; 8 pages of 16 tokens
    # for five sequences growing to 55 tokens: preemption
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=128,
        max_num_batched_tokens=13,
        num_gpu_blocks_override=8,
        enable_prefix_caching=True,
        warmup=True,
    )
    runner = llm.llm_engine.runner
    compiled = (runner.num_compiled(), backend_compile_count())
    ids = _ids(llm.get_tokenizer())[:-1]  # within max_model_len
    ref = hf_greedy(path, ids, NEW_TOKENS)
    assert [o[0] for o in _generate(llm, ids)] == ref
    assert llm.llm_engine.scheduler.num_preemptions > 0

    two = _generate(llm, ids[1:2], n=2)[0]  # each completion holds its own state slot
    assert two == [ref[1], ref[1]]
    again = llm.generate(
        [{"prompt_token_ids": ids[3]}],
        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
        use_tqdm=False,
    )[0]  # its pages are cached, its state is not: recomputed, never a wrong answer
    assert again.outputs[0].token_ids == ref[3] and again.num_cached_tokens == 0
    assert (runner.num_compiled(), backend_compile_count()) == compiled
    slots = llm.llm_engine.scheduler.state_slots
    assert slots.num_free == slots.num_slots  # every slot came back
