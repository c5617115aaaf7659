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
