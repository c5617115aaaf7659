"""Qwen2-MoE against transformers on a tiny random checkpoint (float32): greedy tokens and
logits, with the shared expert and its sigmoid gate, q/k/v bias, un-normalised top-k weights
and a dense layer (`mlp_only_layers`)."""

import os

import numpy as np
import pytest
import torch

from jaxmm import LLM
from tests.helpers import hf_greedy, make_tokenizer
from tests.models.test_qwen3_moe import NEW_TOKENS, PROMPTS, _generate, _last_logits


def make_qwen2_moe_checkpoint(root: str, name: str, vocab_size: int = 256, **overrides) -> str:
    """A tiny Qwen2-MoE (4 experts, top-2, a shared expert, layer 1 dense) saved by
    transformers' `save_pretrained`; returns the directory."""
    import transformers

    path = os.path.join(root, name)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(path, vocab_size)
    kw = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    kw.update(overrides)
    cfg = transformers.Qwen2MoeConfig(**kw)
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(cfg)
    with torch.no_grad():  # larger than default so greedy paths are not decided by ties
        for p in model.parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.5)
            if p.dim() == 1 and p.shape[0] == cfg.hidden_size:
                p.abs_().add_(0.5)  # norm weights
    model.eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen2_moe(ckpt_root):
    return make_qwen2_moe_checkpoint(ckpt_root, "qwen2_moe")


def test_greedy_and_logits_match_transformers(qwen2_moe):
    from transformers import AutoModelForCausalLM

    llm = LLM(qwen2_moe, dtype="float32", max_model_len=256, max_num_batched_tokens=256)
    mlp = llm.llm_engine.runner.params["model"]["layers"][0]["mlp"]
    assert mlp["shared_expert_gate"]["kernel"].get_value().shape == (32, 1)
    assert "bias" in llm.llm_engine.runner.params["model"]["layers"][0]["self_attn"]["q_proj"]
    tok = llm.get_tokenizer()
    ids = [tok(p).input_ids for p in PROMPTS]
    assert _generate(llm, ids) == hf_greedy(qwen2_moe, ids, NEW_TOKENS)

    model = AutoModelForCausalLM.from_pretrained(qwen2_moe, dtype=torch.float32).eval()
    assert not model.config.norm_topk_prob
    with torch.no_grad():
        ref = np.stack([model(torch.tensor([i])).logits[0, -1].numpy() for i in ids])
    np.testing.assert_allclose(_last_logits(llm, ids), ref, atol=1e-4, rtol=0)
