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


# ---------------------------------------------------------------------------------------
# The host side: features and placeholder counts as Gemma4Processor makes them

SPECIAL_TOKENS = dict(
    image_token="<|image|>",
    boi_token="<|image>",
    eoi_token="<image|>",
    audio_token="<|audio|>",
    boa_token="<|audio>",
    eoa_token="<audio|>",
)


def gemma4_processor(path: str, feature_size: int = 16):
    """A Gemma4Processor with a locally trained tokenizer carrying Gemma 4's named
    multimodal tokens (the video processor is a stand-in where torchvision is missing)."""
    import transformers
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.video_processing_utils import BaseVideoProcessor

    from tests.helpers import make_processor, make_tokenizer

    make_tokenizer(path)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(
        path, extra_special_tokens=SPECIAL_TOKENS
    )
    try:
        from transformers import Gemma4VideoProcessor

        video = Gemma4VideoProcessor()
    except ImportError:
        video = BaseVideoProcessor()
    return make_processor(
        transformers.Gemma4Processor,
        feature_extractor=transformers.Gemma4AudioFeatureExtractor(feature_size=feature_size),
        image_processor=Gemma4ImageProcessorPil(),
        tokenizer=tok,
        video_processor=video,
    )


def test_gemma4_audio_features_and_counts_match_processor(tmp_path):
    from jaxmm.models.encoders.gemma4_audio import audio_item_features, audio_num_tokens
    from jaxmm.multimodal.audio import load_audio_item

    proc = gemma4_processor(str(tmp_path))
    tok = proc.tokenizer
    # a stereo 44.1 kHz clip (channels last) and a mono 16 kHz one, as the front end loads them
    # (48000 samples: 1.09 s at 44.1 kHz)
    stereo = np.stack([_tone(3.0, 300, 2), _tone(3.0, 500, 3)], axis=1)
    long = load_audio_item((stereo, 44100), SR)
    short = load_audio_item((_tone(0.41, 800, 4), SR), SR)
    x = proc(text="a <|audio|> b <|audio|>", audio=[long, short], return_tensors="np")
    ids = x["input_ids"][0].tolist()
    audio_id, boa, eoa = (
        tok.convert_tokens_to_ids(SPECIAL_TOKENS[k])
        for k in ("audio_token", "boa_token", "eoa_token")
    )
    # HF's expansion: <boa> + n x audio token + <eoa> per clip
    starts = [i for i, t in enumerate(ids) if t == boa]
    counts = [ids.index(eoa, s) - s - 1 for s in starts]
    assert all(set(ids[s + 1 : s + 1 + n]) == {audio_id} for s, n in zip(starts, counts))
    for b, clip in enumerate([long, short]):
        item = audio_item_features(proc.feature_extractor, clip, SR, {})
        mask = item["input_features_mask"]
        assert audio_num_tokens(mask) == counts[b]
        n = int(mask.sum())
        assert n == int(x["input_features_mask"][b].sum())
        np.testing.assert_allclose(
            item["input_features"][:n], x["input_features"][b, :n], atol=1e-5, rtol=0
        )
    assert counts[0] > counts[1] > 0
    with pytest.raises(ValueError, match="too short"):
        audio_item_features(proc.feature_extractor, np.zeros(100, np.float32), SR, {})
