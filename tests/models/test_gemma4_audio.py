"""Gemma 4 audio tower parity with transformers on a tiny random tower (float32).

The tower (`Gemma4AudioModel`) and the audio embedder (`Gemma4MultimodalEmbedder`) are
built with transformers, randomised (clip bounds included), saved under the names a
Gemma 4 checkpoint uses (`model.audio_tower.*`, `model.embed_audio.*`) and loaded through
jaxmm's loader. Features come from HF's `Gemma4AudioFeatureExtractor`: two clips of
different lengths in one padded batch, so the shorter one is masked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

SR = 16000


def _tone(seconds: float, f0: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * np.sin(2 * np.pi * f0 * t * (1 + t)) + 0.05 * noise).astype(np.float32)


def audio_config(**kw):
    import transformers

    base = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        subsampling_conv_channels=[16, 8],  # 16 mel bins: c0 // 4 mel bins after subsampling
        attention_chunk_size=4,
        attention_context_left=5,
        attention_context_right=0,
        conv_kernel_size=3,
        output_proj_dims=48,
    )
    return transformers.Gemma4AudioConfig(**(base | kw))


def _randomize(module, seed: int) -> None:
    """Larger-than-default weights; clip bounds finite on some layers so clamping bites."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0, 0.15 if p.dim() > 1 else 0.5)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.abs_().add_(0.5)
        for name, b in module.named_buffers():
            if name.endswith(("input_min", "output_min")) and "layers.1." in name:
                b.fill_(-0.4)
            elif name.endswith(("input_max", "output_max")) and "layers.1." in name:
                b.fill_(0.4)


def _owner(cfg, text_hidden: int):
    from flax import nnx

    from jaxmm.models.encoders.gemma4_audio import Gemma4AudioModel, Gemma4MultimodalEmbedder

    class TextConfig:
        hidden_size = text_hidden

    class Owner(nnx.Module):  # a model holding the tower as Gemma 4 does, HF keys `model.*`
        hf_key_rules = ((r"^model\.", ""),)

        def __init__(self):
            rngs = nnx.Rngs(0)
            self.audio_tower = Gemma4AudioModel(cfg, rngs=rngs)
            self.embed_audio = Gemma4MultimodalEmbedder(cfg, TextConfig, rngs=rngs)

    return Owner


@pytest.mark.parametrize("right", [0, 2])
def test_gemma4_audio_tower_matches_transformers(right):
    import jax
    import transformers
    from flax import nnx
    from transformers.models.gemma4 import modeling_gemma4 as hf_gemma4

    from jaxmm.models.encoders.gemma4_audio import audio_num_tokens, encode_audio_items
    from jaxmm.runner.model_runner import make_mesh
    from jaxmm.weights.loader import load_params

    cfg = audio_config(attention_context_right=right)
    text_cfg = transformers.Gemma4TextConfig(hidden_size=64, num_hidden_layers=1)
    tower = hf_gemma4.Gemma4AudioModel(cfg).eval()
    embedder = hf_gemma4.Gemma4MultimodalEmbedder(cfg, text_cfg).eval()
    _randomize(tower, 1)
    _randomize(embedder, 2)

    fe = transformers.Gemma4AudioFeatureExtractor(feature_size=16)
    clips = [_tone(0.93, 400, 0), _tone(0.37, 700, 1)]
    x = fe(clips, sampling_rate=SR, return_tensors="pt")  # padded to the longer clip
    feats, mask = x["input_features"], x["input_features_mask"]
    assert not bool(mask[1].all())  # the short clip is padded
    with torch.no_grad():
        out = tower(feats, mask)
        ref_rows = embedder(out.last_hidden_state).numpy()
    ref, ref_mask = out.last_hidden_state.numpy(), out.attention_mask.numpy()

    Owner = _owner(cfg, 64)
    owner = nnx.eval_shape(Owner)
    graphdef, abstract = nnx.split(owner)
    tensors = [(f"model.audio_tower.{k}", v.numpy()) for k, v in tower.state_dict().items()]
    tensors += [(f"model.embed_audio.{k}", v.numpy()) for k, v in embedder.state_dict().items()]
    model = nnx.merge(graphdef, load_params(owner, abstract, tensors, make_mesh(1), None))

    hidden, our_mask = jax.jit(model.audio_tower)(feats.numpy(), mask.numpy())
    np.testing.assert_array_equal(np.asarray(our_mask), ref_mask)
    for b in range(2):  # real rows; padded rows are discarded by the model
        keep = ref_mask[b]
        np.testing.assert_allclose(np.asarray(hidden)[b, keep], ref[b, keep], atol=1e-4, rtol=0)

    # the encoder stage: each item alone, padded to its own bucket, gives HF's batched rows
    @jax.jit
    def run(params, f, m):
        owner = nnx.merge(graphdef, params)
        return owner.embed_audio(owner.audio_tower(f, m)[0])

    params = nnx.state(model)
    items = [
        {"input_features": feats[b].numpy(), "input_features_mask": mask[b].numpy()}
        for b in range(2)
    ]
    rows = encode_audio_items(run, params, items)
    for b, r in enumerate(rows):
        n = audio_num_tokens(mask[b].numpy())
        assert len(r) == n == int(ref_mask[b].sum())
        got = np.asarray(r.array)[r.start : r.stop]
        np.testing.assert_allclose(got, ref_rows[b, :n], atol=1e-4, rtol=0)
