"""Gemma 3 parity with transformers on tiny random checkpoints (float32), and its SigLIP tower.

The SigLIP tower is checked alone against `transformers.SiglipVisionModel` (its hidden states
and `last_hidden_state`), through the same loader rules a model holding it uses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _randomize(model, seed: int) -> None:
    """Larger-than-default weights so greedy paths are not dominated by ties."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.5)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.abs_().add_(0.5)


def _siglip_config(**kw):
    import transformers

    base = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        vision_use_head=False,
    )
    return transformers.SiglipVisionConfig(**(base | kw))


@pytest.mark.parametrize("use_head", [False, True])
def test_siglip_tower_matches_transformers(use_head):
    import jax
    import transformers
    from flax import nnx

    from jaxmm.models.encoders import siglip
    from jaxmm.runner.model_runner import make_mesh
    from jaxmm.weights.loader import load_params

    cfg = _siglip_config(vision_use_head=use_head)
    hf = transformers.SiglipVisionModel(cfg).eval()
    _randomize(hf, 3)

    class Owner(nnx.Module):  # a model holding the tower at "vision_tower"
        hf_key_rules = siglip.hf_key_rules("vision_tower")
        ignored_hf_keys = siglip.ignored_hf_keys("vision_tower")

        def __init__(self):
            self.vision_tower = siglip.SiglipVisionModel(cfg, rngs=nnx.Rngs(0))

    owner = nnx.eval_shape(Owner)
    graphdef, abstract = nnx.split(owner)
    # the hub's spelling: vision_tower.vision_model.*
    tensors = [(f"vision_tower.vision_model.{k}", v.numpy()) for k, v in hf.state_dict().items()]
    model = nnx.merge(graphdef, load_params(owner, abstract, tensors, make_mesh(1), None))

    pixels = np.random.RandomState(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.tensor(pixels), output_hidden_states=True)
    states = jax.jit(lambda x: model.vision_tower(x, num_states=3))(pixels)
    assert len(states) == 3
    for got, want in zip(states, ref.hidden_states[:3]):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5, rtol=0)
    last = jax.jit(model.vision_tower.last_hidden_state)(pixels)
    np.testing.assert_allclose(np.asarray(last), ref.last_hidden_state.numpy(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# Gemma3ForCausalLM

WINDOW = 8  # sliding window of the local layers: every long prompt here leaves it
NEW_TOKENS = 12


def _text_config(tok, **kw) -> dict:
    return dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,  # not head_dim: the scale must come from it
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 1
        + ["sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        },
        final_logit_softcapping=3.0,  # small enough to bend the logits
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kw,
    )


def make_gemma3_text(root: str) -> str:
    import os

    import transformers

    from tests.helpers import make_tokenizer

    path = os.path.join(root, "gemma3_text")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = make_tokenizer(path)
    cfg = transformers.Gemma3TextConfig(**_text_config(tok))
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    _randomize(model, 0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma3_text(ckpt_root):
    return make_gemma3_text(ckpt_root)


TEXT_PROMPTS = [
    "Hello, my name is",
    "The capital of France is Paris. The capital of Italy",
    "Once upon a time there was a small model that generated tokens one by one and",
]


def test_text_greedy_and_logits_match_transformers(gemma3_text):
    import math

    from jaxmm import LLM, SamplingParams
    from jaxmm.runner.model_runner import SeqStep
    from tests.helpers import hf_greedy

    # 16 tokens a step: the long prompts prefill in chunks, each past the window
    llm = LLM(gemma3_text, dtype="float32", max_model_len=256, max_num_batched_tokens=16)
    tok = llm.get_tokenizer()
    ids = [tok(p).input_ids for p in TEXT_PROMPTS]
    assert max(len(i) for i in ids) > 2 * WINDOW
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    ours = [o.outputs[0].token_ids for o in outs]
    assert ours == hf_greedy(gemma3_text, ids, NEW_TOKENS)
    assert any(len(set(t)) > 2 for t in ours)  # not a degenerate model

    import transformers

    hf = transformers.Gemma3ForCausalLM.from_pretrained(gemma3_text, dtype=torch.float32).eval()
    runner = llm.llm_engine.runner
    page, got, want = runner.num_pages - 1, [], []
    for i in ids:  # one sequence per call, scratch pages from the top of the pool
        n = math.ceil(len(i) / runner.block_size)
        table = list(range(page - n + 1, page + 1))
        for start in range(0, len(i), 16):  # the step budget: chunks, as the engine runs them
            chunk = i[start : start + 16]
            step = SeqStep(chunk, start, table, sample=start + len(chunk) == len(i))
            last = runner.logits([step])
        got.append(last)
        page -= n
        with torch.no_grad():
            want.append(hf(torch.tensor([i])).logits[0, -1].numpy())
    np.testing.assert_allclose(np.concatenate(got), np.stack(want), atol=1e-4, rtol=0)
