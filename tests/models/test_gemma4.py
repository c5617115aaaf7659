"""Gemma 4 parity with transformers on tiny random checkpoints (float32).

Text: two configs between them cover what Gemma 4 adds to Gemma 3: per-layer head sizes and
KV heads (global layers wider, `attention_k_eq_v`), proportional RoPE, per-layer inputs,
KV sharing (the last layers read their producer's pages and own none), and the MoE block
beside the dense MLP with a double-wide MLP on shared layers. Prompts run past the sliding
window and prefill in chunks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.models.test_gemma3 import _randomize

WINDOW = 8  # sliding window of the local layers: the long prompts leave it
NEW_TOKENS = 10
BUDGET = 16  # tokens per step: long prompts prefill in chunks
S, F = "sliding_attention", "full_attention"


def _text_config(tok, variant: str) -> dict:
    base = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=WINDOW,
        final_logit_softcapping=5.0,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if variant == "shared":  # per-layer shapes, PLE, K = V, KV sharing
        return base | dict(
            num_hidden_layers=5,
            layer_types=[S, F, S, S, F],
            global_head_dim=32,
            attention_k_eq_v=True,
            num_global_key_value_heads=1,
            num_kv_shared_layers=2,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=len(tok),
            rope_parameters={
                S: {"rope_type": "default", "rope_theta": 10_000.0},
                F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
            },
        )
    return base | dict(  # "moe": experts beside the MLP, double-wide MLP on shared layers
        num_hidden_layers=4,
        layer_types=[S, F, S, F],
        global_head_dim=24,
        num_kv_shared_layers=1,
        use_double_wide_mlp=True,
        # transformers' generate needs PLE where layers share KV (its slicing reads them)
        hidden_size_per_layer_input=4,
        vocab_size_per_layer_input=len(tok),
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=32,
        rope_parameters={
            S: {"rope_type": "default", "rope_theta": 10_000.0},
            F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e4},
        },
    )


def make_gemma4_text(root: str, variant: str) -> str:
    import os

    import transformers

    from tests.helpers import make_tokenizer

    path = os.path.join(root, f"gemma4_text_{variant}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(path)
    cfg = transformers.Gemma4TextConfig(**_text_config(tok, variant))
    model = transformers.Gemma4ForCausalLM(cfg).eval()
    _randomize(model, 0)
    with torch.no_grad():  # layer scalars are buffers: away from one, to be seen
        for i, layer in enumerate(model.model.layers):
            layer.layer_scalar.fill_(0.8 + 0.1 * i)
            if cfg.enable_moe_block:
                layer.router.per_expert_scale.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


TEXT_PROMPTS = [
    "Hello, my name is",
    "The capital of France is Paris. The capital of Italy",
    "Once upon a time there was a small model that generated tokens one by one and",
]


@pytest.mark.parametrize("variant", ["shared", "moe"])
def test_text_greedy_and_logits_match_transformers(ckpt_root, variant):
    import math

    import transformers

    from jaxmm import LLM, SamplingParams
    from jaxmm.runner.model_runner import SeqStep
    from tests.helpers import hf_greedy

    path = make_gemma4_text(ckpt_root, variant)
    llm = LLM(path, dtype="float32", max_model_len=256, max_num_batched_tokens=BUDGET)
    tok = llm.get_tokenizer()
    ids = [tok(p).input_ids for p in TEXT_PROMPTS]
    ids.append(ids[2] + ids[1])
    assert max(len(i) for i in ids) > WINDOW + BUDGET
    runner = llm.llm_engine.runner
    if variant == "shared":
        # layers 3 and 4 read layers 0 and 1's pages: three page pools, each its own shape
        # (global layers: one KV head of 32, local ones two of 16)
        assert runner.num_layers == 3
        shapes = [tuple(c.shape[i] for i in (1, 4)) for c in runner.kv_caches[:3]]
        assert shapes == [(2, 16), (1, 32), (2, 16)]
    else:
        assert runner.num_layers == 3
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    ours = [o.outputs[0].token_ids for o in outs]
    assert ours == hf_greedy(path, ids, NEW_TOKENS)
    assert any(len(set(t)) > 2 for t in ours)  # not a degenerate model

    hf = transformers.Gemma4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    page, got, want = runner.num_pages - 1, [], []
    for i in ids:  # one sequence per call, scratch pages from the top of the pool
        n = math.ceil(len(i) / runner.block_size)
        table = list(range(page - n + 1, page + 1))
        for start in range(0, len(i), BUDGET):  # chunks, as the engine runs them
            chunk = i[start : start + BUDGET]
            step = SeqStep(chunk, start, table, sample=start + len(chunk) == len(i))
            last = runner.logits([step])
        got.append(last)
        page -= n
        with torch.no_grad():
            want.append(hf(torch.tensor([i])).logits[0, -1].numpy())
    np.testing.assert_allclose(np.concatenate(got), np.stack(want), atol=1e-4, rtol=0)
