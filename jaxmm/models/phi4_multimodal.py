"""Phi-4-multimodal (`Phi4MultimodalForCausalLM`): Phi-3-style decoder, image and audio towers.

Text: Phi-3's decoder (Llama's blocks) with q/k/v fused in `qkv_proj` and gate/up in
`gate_up_proj` (split on load into the column-parallel projections every decoder here
has), rotary on the first `partial_rotary_factor` of each head, and LongRoPE
(`rope_type` "longrope", Phi's "su"): inverse frequencies divided by `short_factor`, cos and
sin scaled by `attention_factor` (default sqrt(1 + ln(max / original) / ln(original))).
transformers switches every position to `long_factor` once a sequence is longer than
`original_max_position_embeddings`; here a position at or past it takes `long_factor`
(vLLM's choice), so prompts shorter than that are exact.

Images (`embed_tokens_extend.image_embed`): HD crops made on the host as transformers'
`Phi4MultimodalImageProcessor` makes them (`encoders/phi4mm_image.py`; transformers' own
needs torchvision), then the SigLIP tower with patch masks, 2 x 2 pooling, newline
extensors and the two-layer projection (`encoders/phi4mm_vision.py`); one row per
`<|image|>` token (`num_img_tokens`).

Audio (`embed_tokens_extend.audio_embed`): the conformer of `encoders/phi4mm_audio.py` over
the checkpoint's own feature extractor's log-mel frames (`Phi4MultimodalFeatureExtractor`,
which needs torch), then `up_proj_for_speech` -> GELU -> `down_proj_for_speech`, one row per
`<|audio|>` token (`audio_embed_sizes` of them; the front end expands each placeholder).
Audio beside images in one prompt goes through the `*_for_vision_speech` pair instead, as
transformers does (`mm_audio_processor_kwargs`: the choice keys the audio's hash).

Weights: transformers saves `model.*` and `lm_head.*`; the module tree mirrors it.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.attention import AttentionMetadata, paged_attention
from jaxmm.layers.linear import Embed, Linear
from jaxmm.layers.norm import RMSNorm
from jaxmm.layers.rope import apply_rotary, rope_parameters
from jaxmm.models.device_rows import DeviceRows
from jaxmm.models.encoders import phi4mm_image
from jaxmm.models.encoders.phi4mm_audio import Phi4MultimodalAudioModel
from jaxmm.models.encoders.phi4mm_vision import (
    Phi4MultimodalImageEmbedding,
    position_ids,
    token_index,
)
from jaxmm.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    head_dim,
)
from jaxmm.models.llava import next_pow2

_FUSED = re.compile(r"^(.*)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)\.weight$")


def rotary_dim(config) -> int:
    factor = rope_parameters(config).get("partial_rotary_factor", 1.0)
    return int(head_dim(config) * factor)


def rope_tables(config) -> tuple[np.ndarray, np.ndarray, float, int]:
    """(short inv_freq (R/2,), long inv_freq (R/2,), cos/sin scale, original length) in
    float32 as transformers computes them; default RoPE gives equal tables and scale 1."""
    params = rope_parameters(config)
    R = rotary_dim(config)
    base = float(params["rope_theta"])
    inv = 1.0 / (base ** (np.arange(0, R, 2, dtype=np.int64).astype(np.float32) / R))
    rope_type = params.get("rope_type", "default")
    if rope_type in ("su", "yarn"):  # Phi's older names, read as longrope by transformers
        rope_type = "longrope"
    if rope_type == "default":
        return inv, inv, 1.0, 1 << 62
    if rope_type != "longrope":
        raise ValueError(
            f"Phi-4-multimodal with rope_type {rope_type!r} is not supported (default, longrope)"
        )
    original = params.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None
    )
    original = int(original or config.max_position_embeddings)
    factor = params.get("factor") or config.max_position_embeddings / original
    scale = params.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    powers = base ** (np.arange(0, R, 2, dtype=np.int64).astype(np.float32) / R)
    short = 1.0 / (np.asarray(params["short_factor"], np.float32) * powers)
    long = 1.0 / (np.asarray(params["long_factor"], np.float32) * powers)
    return short.astype(np.float32), long.astype(np.float32), float(scale), original


class Phi4MultimodalAttention(LlamaAttention):
    def __init__(self, config, layer_idx: int, *, dtype, attention_backend: str, rngs):
        super().__init__(
            config, layer_idx, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        self.R = rotary_dim(config)

    def _rotate(self, x, cos, sin):
        if self.R == self.H:
            return apply_rotary(x, cos, sin)
        return jnp.concatenate([apply_rotary(x[..., : self.R], cos, sin), x[..., self.R :]], -1)

    def __call__(self, x, cos, sin, kv_pages, md: AttentionMetadata):
        T = x.shape[0]
        q = self.q_proj(x).reshape(T, self.N, self.H)  # (T, N, H)
        k = self.k_proj(x).reshape(T, self.K, self.H)  # (T, K, H)
        v = self.v_proj(x).reshape(T, self.K, self.H)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        out, kv_pages = paged_attention(
            q,
            k,
            v,
            kv_pages,
            md,
            sm_scale=self.scale,
            backend=self.backend,
            sliding_window=self.sliding_window,
        )
        return self.o_proj(out.reshape(T, self.N * self.H)), kv_pages


class Phi4MultimodalDecoderLayer(LlamaDecoderLayer):
    attention_cls = Phi4MultimodalAttention


class Phi4MultimodalAudioEmbedding(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        ac, Dt = config.audio_config, config.hidden_size
        Da = ac.hidden_size * ac.downsample_rate
        self.encoder = Phi4MultimodalAudioModel(ac, dtype=dtype, rngs=rngs)
        self.up_proj_for_speech = Linear(Da, Dt, bias=True, dtype=dtype, rngs=rngs)
        self.down_proj_for_speech = Linear(Dt, Dt, bias=True, dtype=dtype, rngs=rngs)
        self.up_proj_for_vision_speech = Linear(Da, Dt, bias=True, dtype=dtype, rngs=rngs)
        self.down_proj_for_vision_speech = Linear(Dt, Dt, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, features: jax.Array, vision: bool = False) -> jax.Array:
        """features (B, T, F) -> (B, C, D_text), through the speech pair of projections, or
        the vision-speech pair for audio in a prompt with images (`vision`)."""
        up, down = self.up_proj_for_speech, self.down_proj_for_speech
        if vision:
            up, down = self.up_proj_for_vision_speech, self.down_proj_for_vision_speech
        return down(jax.nn.gelu(up(self.encoder(features)), approximate=False))


class Phi4MultimodalFeatureEmbedding(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.image_embed = Phi4MultimodalImageEmbedding(config, dtype=dtype, rngs=rngs)
        self.audio_embed = Phi4MultimodalAudioEmbedding(config, dtype=dtype, rngs=rngs)


class Phi4MultimodalModel(LlamaModel):
    layer_cls = Phi4MultimodalDecoderLayer

    def __init__(self, config, *, dtype, attention_backend: str, rngs):
        # not LlamaModel.__init__: its rotary table knows no longrope
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                self.layer_cls(
                    config, i, dtype=dtype, attention_backend=attention_backend, rngs=rngs
                )
                for i in range(config.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        short, long, scale, original = rope_tables(config)
        self.short_freq = tuple(float(f) for f in short)
        self.long_freq = tuple(float(f) for f in long)
        self.rope_scale, self.original_positions = scale, original
        if getattr(config, "audio_config", None) is not None:
            self.embed_tokens_extend = Phi4MultimodalFeatureEmbedding(
                config, dtype=dtype, rngs=rngs
            )

    def rotary(self, positions):
        """positions (T,) -> cos, sin (T, R): LongRoPE's short table below the original
        length, the long one from it on; both scaled like transformers' cos / sin."""
        short = jnp.asarray(np.array(self.short_freq, np.float32))
        long = jnp.asarray(np.array(self.long_freq, np.float32))
        inv = jnp.where((positions >= self.original_positions)[:, None], long[None], short[None])
        freqs = positions.astype(jnp.float32)[:, None] * inv  # (T, R/2)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb) * self.rope_scale, jnp.sin(emb) * self.rope_scale


class Phi4MultimodalForCausalLM(LlamaForCausalLM):
    model_cls = Phi4MultimodalModel
    is_multimodal = True
    mm_modalities = ("image", "audio")
    uses_mrope = False
    hf_key_rules = ((r"(audio_embed\.encoder\.embed\.conv)\.(\d+)\.", r"\1_\2."),)
    ignored_hf_keys = (
        r"rotary_emb\.inv_freq",
        r"position_ids$",
        # the pooling head of the image tower: no feature layer reads it
        r"^model\.embed_tokens_extend\.image_embed\.img_processor\.head\.",
    )

    def __init__(self, config, *, dtype=jnp.float32, attention_backend: str = "reference", rngs):
        super().__init__(config, dtype=dtype, attention_backend=attention_backend, rngs=rngs)
        self.hf_config = config
        if getattr(config, "audio_config", None) is None:
            self.mm_modalities = ()
            self.is_multimodal = False

    def convert_hf_tensor(self, key: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """Splits `qkv_proj` into q / k / v and `gate_up_proj` into gate / up (rows, in
        that order), so the projections shard column-wise like every decoder's."""
        m = _FUSED.match(key)
        if m is None:
            return [(key, array)]
        prefix, name = m.groups()
        if name == "mlp.gate_up_proj":
            gate, up = np.split(np.asarray(array), 2, axis=0)
            return [(f"{prefix}.mlp.gate_proj.weight", gate), (f"{prefix}.mlp.up_proj.weight", up)]
        c = self.config
        q_rows = c.num_attention_heads * head_dim(c)
        kv_rows = c.num_key_value_heads * head_dim(c)
        q, k, v = np.split(np.asarray(array), [q_rows, q_rows + kv_rows], axis=0)
        return [
            (f"{prefix}.self_attn.q_proj.weight", q),
            (f"{prefix}.self_attn.k_proj.weight", k),
            (f"{prefix}.self_attn.v_proj.weight", v),
        ]

    # -- the multimodal contract (plain Python; see models/llava.py) -------------------------
    def mm_token_id(self, modality: str) -> int:
        if modality == "image":
            return int(self.hf_config.vision_config.image_token_id)
        return int(self.hf_config.audio_config.audio_token_id)

    def mm_prompt_placeholder(self, modality: str) -> list[int]:
        return [self.mm_token_id(modality)]

    def mm_placeholder_text(self, modality: str) -> str:
        """The tokens transformers' Phi-4-multimodal tokenizer names `image_token` and
        `audio_token`."""
        return "<|image|>" if modality == "image" else "<|audio|>"

    def mm_audio_processor_kwargs(self, modalities: list[str]) -> dict:
        """The audio's projection follows the prompt's other items: transformers uses the
        vision-speech pair when the prompt has images (the option keys the audio's hash)."""
        return {"audio_projection": "vision"} if "image" in modalities else {}

    def mm_audio_features(self, feature_extractor, audio: np.ndarray, sampling_rate: int, kwargs):
        """One clip -> what the encoder takes: its log-mel frames (T, F), its number of audio
        tokens (the checkpoint's own feature extractor) and its projection."""
        kwargs = dict(kwargs or {})
        projection = kwargs.pop("audio_projection", "speech")
        if projection not in ("speech", "vision"):
            raise ValueError(f"audio_projection is 'speech' or 'vision', got {projection!r}")
        out = feature_extractor(audio, sampling_rate=sampling_rate, return_tensors="np", **kwargs)
        return {
            "audio_input_features": np.asarray(out["audio_input_features"][0], np.float32),
            "audio_embed_size": int(np.asarray(out["audio_embed_sizes"]).reshape(-1)[0]),
            "audio_projection": projection,
        }

    def mm_process_image(self, image, config: dict | None, overrides: dict | None) -> dict:
        """One RGB image -> its HD crops, patch masks and token count (`phi4mm_image`), from
        the checkpoint's image processor config."""
        return phi4mm_image.preprocess(image, phi4mm_image.settings(config, overrides))

    def mm_num_tokens(self, modality: str, item: dict) -> int:
        if modality == "image":
            return self._image_tokens(item)
        frames, mel = np.shape(item["audio_input_features"])
        if mel != self.hf_config.audio_config.input_size:
            raise ValueError(
                f"audio features have {mel} mel bins; this model's encoder takes "
                f"{self.hf_config.audio_config.input_size}"
            )
        n = int(item["audio_embed_size"])
        if not 1 <= n <= self._encoder_frames(frames):
            raise ValueError(f"{n} audio tokens for {frames} mel frames: more than the encoder")
        return n

    def _image_tokens(self, item: dict) -> int:
        vc = self.hf_config.vision_config
        crops, C, S, S2 = np.shape(item["image_pixel_values"])
        if (C, S, S2) != (vc.num_channels, vc.image_size, vc.image_size):
            raise ValueError(
                f"image crops of shape {(C, S, S2)}; this model's tower takes "
                f"{(vc.num_channels, vc.image_size, vc.image_size)} (the image processor's "
                "`size` must be the tower's `image_size`)"
            )
        M = vc.image_size // vc.patch_size
        if (M + 1) // 2 != 16:
            raise ValueError(
                f"the tower pools {M} patches a side to {(M + 1) // 2}; transformers' token "
                "count for this model assumes 16"
            )
        n = int(item["num_img_tokens"])
        if n != len(token_index(item["image_attention_mask"], item["image_size"], S, crops)):
            raise ValueError("the image's token count does not match its crops and mask")
        return n

    def _encoder_frames(self, frames: int) -> int:
        return -(-int(frames) // int(self.hf_config.audio_config.time_reduction))

    def mm_check_embeds(self, modality: str, embeds: np.ndarray, meta: dict) -> dict:
        """Precomputed embeddings (an image's projected token rows, or the audio encoder +
        speech projection's rows of one clip) must be (n, hidden_size)."""
        del meta
        D = self.config.hidden_size
        if embeds.ndim != 2 or embeds.shape[1] != D or not embeds.shape[0]:
            raise ValueError(
                f"{modality} embeddings must have shape (num_{modality}_tokens, hidden_size) = "
                f"(n, {D}) for this model; got {tuple(embeds.shape)}"
            )
        return {}

    def get_audio_features(self, features: jax.Array, vision: bool = False) -> jax.Array:
        """features (1, T, F) -> (1, C, D_text)."""
        return self.model.embed_tokens_extend.audio_embed(features, vision)

    def get_image_features(self, pixel_values, pos_ids, mask, index) -> jax.Array:
        """One image's crops (B, 3, S, S) -> its token rows (n, D_text)."""
        return self.model.embed_tokens_extend.image_embed(pixel_values, pos_ids, mask, index)

    def mm_encoder(self, graphdef):
        """A host function (params, modality, items) -> [rows (n, D_text) per item], left on
        the device (`DeviceRows`). An image per call, its crops padded to a power of two
        (blank crops: each crop is encoded on its own) and its token rows to another. A clip
        per call: the encoder's frame count is the clip's own, its mel frames padded to a
        power of two would change the output (the convolutions and attention see every
        frame, as in transformers)."""

        @functools.partial(jax.jit, static_argnums=2)
        def run(params, features, vision: bool):
            return nnx.merge(graphdef, params).get_audio_features(features, vision)

        @jax.jit
        def run_image(params, pixel_values, pos_ids, mask, index):
            model = nnx.merge(graphdef, params)
            return model.get_image_features(pixel_values, pos_ids, mask, index)

        vc = self.hf_config.vision_config
        per_side = vc.image_size // vc.patch_size

        def encode_image(params, item: dict) -> DeviceRows:
            pixels = np.asarray(item["image_pixel_values"], np.float32)
            mask = np.asarray(item["image_attention_mask"]).astype(bool)
            B = next_pow2(len(pixels))  # bucket: blank crops after the image's own
            padded = np.zeros((B, *pixels.shape[1:]), np.float32)
            padded[: len(pixels)] = pixels
            full = np.ones((B, *mask.shape[1:]), bool)
            full[: len(mask)] = mask
            index = token_index(mask, item["image_size"], pixels.shape[-1], B)
            n = len(index)
            rows = np.zeros(next_pow2(n), np.int32)
            rows[:n] = index
            pos = position_ids(full, per_side)
            out = run_image(params, padded, pos, full.reshape(B, -1), rows)
            return DeviceRows(out, 0, n)

        def encode(params, modality: str, items: list[dict]) -> list[DeviceRows]:
            if modality == "image":
                return [encode_image(params, it) for it in items]
            out = []
            for it in items:
                feats = np.asarray(it["audio_input_features"], np.float32)[None]  # (1, T, F)
                vision = it.get("audio_projection", "speech") == "vision"
                rows = run(params, feats, vision)[0]  # (C, D_text)
                out.append(DeviceRows(rows, 0, int(it["audio_embed_size"])))
            return out

        return encode
