"""LLaVA(-1.5): CLIP vision tower -> feature layer selection -> MLP projector -> a text LM.

Text runs through the text model's own class (Llama, Mistral, Qwen2: `language_model`),
so paged attention, sampling and weights are the text path's. Images are encoded once per
item, before the request is scheduled (`mm_encoder`), and the projected features (one
row per `<image>` token) are spliced over the placeholder tokens by the runner.

Weights: checkpoints saved by transformers use `language_model.model.*`,
`language_model.lm_head.*`, `vision_tower.*` (older hub ones `vision_tower.vision_model.*`),
`multi_modal_projector.*`; the module tree below mirrors that, and `hf_key_rules` fold the
other spellings (`model.language_model.*`, ...) onto it.

The multimodal contract every VLM here offers the front end (`jaxmm.multimodal.inputs`):
`mm_modalities`, `mm_token_id`, `mm_prompt_placeholder`, `mm_num_tokens`,
`mm_check_embeds`, `mm_encoder` (features as `device_rows.DeviceRows`: they stay on the
device), `uses_mrope` (+ `mrope_positions` when True); optionally
`mm_patch_bytes = True` where `mm_encoder` also takes `fast_image.PatchBytes` pixel values
(Qwen2-VL: the byte lookup runs on the device).
"""

from __future__ import annotations

import copy
import importlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.attention import AttentionMetadata
from jaxmm.layers.linear import Linear
from jaxmm.layers.mlp import activation
from jaxmm.models.device_rows import DeviceRows
from jaxmm.models.encoders.clip import CLIPVisionModel
from jaxmm.models.image_tokens import FixedImageTokens

# text model_type -> (module, class) of the language model
TEXT_MODELS = {
    "llama": ("jaxmm.models.llama", "LlamaForCausalLM"),
    "mistral": ("jaxmm.models.mistral", "MistralForCausalLM"),
    "qwen2": ("jaxmm.models.qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("jaxmm.models.qwen3", "Qwen3ForCausalLM"),
}
MAX_IMAGES_PER_CALL = 16  # encoder batch; smaller batches are padded to a power of two


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def text_model_class(text_config):
    model_type = getattr(text_config, "model_type", "llama")
    if model_type not in TEXT_MODELS:
        raise ValueError(
            f"LLaVA with a {model_type!r} language model is not supported; supported: "
            + ", ".join(sorted(TEXT_MODELS))
        )
    module, cls = TEXT_MODELS[model_type]
    return getattr(importlib.import_module(module), cls)


class LlavaMultiModalProjector(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        layers = config.vision_feature_layer
        num_layers = 1 if isinstance(layers, int) else len(layers)
        Dv, Dt = config.vision_config.hidden_size, config.text_config.hidden_size
        bias = getattr(config, "multimodal_projector_bias", True)
        self.linear_1 = Linear(Dv * num_layers, Dt, bias=bias, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(Dt, Dt, bias=bias, dtype=dtype, rngs=rngs)
        self.act = config.projector_hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(activation(self.act)(self.linear_1(x)))


def language_config(config):
    """The text config of a multimodal checkpoint, with tied embeddings resolved from both."""
    text_config = copy.copy(config.text_config)
    text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False)) or bool(
        getattr(text_config, "tie_word_embeddings", False)
    )
    return text_config


class LlavaForConditionalGeneration(FixedImageTokens, nnx.Module):
    is_multimodal = True
    mm_modalities = ("image",)
    uses_mrope = False
    hf_key_rules = (
        (r"^model\.language_model\.", "language_model.model."),
        (r"^model\.vision_tower\.", "vision_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^vision_tower\.vision_model\.", "vision_tower."),
    )

    def __init__(self, config, *, dtype=jnp.float32, attention_backend: str = "reference", rngs):
        self.hf_config = config
        self.config = text_config = language_config(config)
        self.vision_tower = CLIPVisionModel(config.vision_config, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = LlavaMultiModalProjector(config, dtype=dtype, rngs=rngs)
        self.language_model = text_model_class(text_config)(
            text_config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        ignored = [r"rotary_emb\.inv_freq", r"position_ids$"]
        if text_config.tie_word_embeddings:
            ignored.append(r"^language_model\.lm_head\.weight$")
        self.ignored_hf_keys = tuple(ignored)
        self.dtype = dtype

    # -- the text path (what the runner's step calls) ----------------------------------------
    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.language_model.embed(input_ids)

    def __call__(self, input_ids, kv_caches, md: AttentionMetadata, inputs_embeds=None):
        return self.language_model(input_ids, kv_caches, md, inputs_embeds)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        return self.language_model.compute_logits(hidden)

    def kv_cache_spec(self) -> tuple[int, int, int]:
        return self.language_model.kv_cache_spec()

    # -- images --------------------------------------------------------------------------------
    def _feature_layers(self) -> list[int]:
        layers = self.hf_config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        num_states = self.hf_config.vision_config.num_hidden_layers + 1
        return [i % num_states for i in layers]

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values (B, 3, S, S) -> projected features (B, n, D_text)."""
        layers = self._feature_layers()
        states = self.vision_tower(pixel_values.astype(self.dtype), num_states=max(layers) + 1)
        drop_cls = self.hf_config.vision_feature_select_strategy == "default"
        feats = [states[i][:, 1:] if drop_cls else states[i] for i in layers]
        return self.multi_modal_projector(jnp.concatenate(feats, axis=-1))

    # -- the multimodal contract (plain Python; see the module docstring) ---------------------
    def mm_token_id(self, modality: str) -> int:
        return int(self.hf_config.image_token_id)

    def mm_prompt_placeholder(self, modality: str) -> list[int]:
        return [self.mm_token_id(modality)]

    def _tokens_per_image(self) -> int:
        vc = self.hf_config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n if self.hf_config.vision_feature_select_strategy == "default" else n + 1

    def mm_encoder(self, graphdef):
        """A host function (params, modality, items) -> [features (n, D_text) per item], left
        on the device (`DeviceRows`, in the model's dtype) for the runner to splice."""

        @jax.jit
        def run(params, pixel_values):
            return nnx.merge(graphdef, params).get_image_features(pixel_values)

        def encode(params, modality: str, items: list[dict]) -> list[DeviceRows]:
            pixels = np.stack([np.asarray(it["pixel_values"], np.float32) for it in items])
            out = []
            for i in range(0, len(pixels), MAX_IMAGES_PER_CALL):
                chunk = pixels[i : i + MAX_IMAGES_PER_CALL]
                B = next_pow2(len(chunk))  # bucket: one program per power of two
                padded = np.zeros((B, *chunk.shape[1:]), np.float32)
                padded[: len(chunk)] = chunk
                feats = run(params, padded)  # (B, n, D_text)
                n = feats.shape[1]
                flat = feats.reshape(-1, feats.shape[-1])  # (B * n, D_text)
                out.extend(DeviceRows(flat, j * n, (j + 1) * n) for j in range(len(chunk)))
            return out

        return encode
