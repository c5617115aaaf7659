"""Qwen2-Audio: a Whisper-style audio encoder + average pooling + a linear projector -> Qwen2.

Audio (log-mel features padded to the 30 s window, with the mask of real frames) ->
Whisper encoder stem and layers, attending only to real frames -> average pool over pairs
of frames -> LayerNorm -> `multi_modal_projector.linear` -> one row per audio token. The
HF processor expands each `<|AUDIO|>` placeholder to the item's number of rows
(`((frames - 1) // 2 + 1 - 2) // 2 + 1`); the front end (`jaxmm.multimodal.audio_inputs`)
runs the encoder once per item when the prompt is prepared, and the runner splices the rows
over the placeholders. Text runs through Qwen2 (`language_model`), paged as any decoder.

Weights: hub checkpoints use `audio_tower.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.*`; the module tree mirrors that and
`hf_key_rules` fold transformers 5's `model.*` spellings (and the doubled
`language_model.model.model.*` some 5.x versions save) onto it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.attention import AttentionMetadata
from jaxmm.layers.linear import Linear
from jaxmm.models.device_rows import DeviceRows
from jaxmm.models.llava import language_config
from jaxmm.models.qwen2 import Qwen2ForCausalLM
from jaxmm.models.whisper import WhisperEncoder, next_pow2

MAX_AUDIOS_PER_CALL = 8  # encoder batch; smaller batches are padded to a power of two


def audio_output_lengths(num_frames):
    """Mel frames -> (frames after the stride-2 conv, audio tokens after pooling)."""
    after_conv = (num_frames - 1) // 2 + 1
    return after_conv, (after_conv - 2) // 2 + 1


class Qwen2AudioEncoder(WhisperEncoder):
    """Whisper's encoder with a key mask over padded frames, then 2x average pooling."""

    def __call__(self, features: jax.Array, lengths: jax.Array) -> jax.Array:
        """features (B, mel, 2C), lengths (B,) real frames after the conv -> (B, C/2, D)."""
        x = self.embed_features(features)  # (B, C, D)
        B, C, D = x.shape
        keep = jnp.arange(C)[None, :] < lengths[:, None]  # (B, C)
        bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        x = x[:, : C // 2 * 2].reshape(B, C // 2, 2, D).mean(axis=2)  # AvgPool1d(2, 2)
        return self.layer_norm(x)


class Qwen2AudioMultiModalProjector(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        Da, Dt = config.audio_config.d_model, config.text_config.hidden_size
        self.linear = Linear(Da, Dt, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(x)


class Qwen2AudioForConditionalGeneration(nnx.Module):
    is_multimodal = True
    mm_modalities = ("audio",)
    uses_mrope = False
    hf_key_rules = (
        # save_pretrained of transformers 5.17-5.21 (at least) doubles the text model's prefix
        # (its reverse of `^language_model.model -> model.language_model`); HF loads it back
        # as language_model.model.*, and so does this
        (r"^language_model\.model\.model\.", "language_model.model."),
        (r"^model\.language_model\.", "language_model.model."),
        (r"^model\.audio_tower\.", "audio_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^lm_head\.", "language_model.lm_head."),
    )

    def __init__(self, config, *, dtype=jnp.float32, attention_backend: str = "reference", rngs):
        self.hf_config = config
        self.config = text_config = language_config(config)
        self.audio_tower = Qwen2AudioEncoder(config.audio_config, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = Qwen2AudioMultiModalProjector(config, dtype=dtype, rngs=rngs)
        self.language_model = Qwen2ForCausalLM(
            text_config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        ignored = [r"rotary_emb\.inv_freq", r"position_ids$"]
        if text_config.tie_word_embeddings:
            ignored.append(r"^language_model\.lm_head\.weight$")
        self.ignored_hf_keys = tuple(ignored)
        self.num_frames = self.audio_tower.num_frames

    # -- the text path (what the runner's step calls) ----------------------------------------
    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.language_model.embed(input_ids)

    def __call__(self, input_ids, kv_caches, md: AttentionMetadata, inputs_embeds=None):
        return self.language_model(input_ids, kv_caches, md, inputs_embeds)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        return self.language_model.compute_logits(hidden)

    def kv_cache_spec(self) -> tuple[int, int, int]:
        return self.language_model.kv_cache_spec()

    # -- audio ---------------------------------------------------------------------------------
    def mm_token_id(self, modality: str) -> int:
        del modality
        return int(self.hf_config.audio_token_index)

    def mm_placeholder_text(self, modality: str) -> str:
        del modality
        return "<|audio_bos|><|AUDIO|><|audio_eos|>"

    def mm_num_tokens(self, modality: str, item: dict) -> int:
        """Rows the audio encoder gives for an item (its valid mel frames, conv and pooling)."""
        del modality
        return int(audio_output_lengths(int(np.asarray(item["feature_attention_mask"]).sum()))[1])

    def mm_check_embeds(self, modality: str, embeds: np.ndarray, meta: dict) -> dict:
        """Precomputed audio embeddings (the tower + projector's rows of one item) must be
        (n, hidden_size), n at most what the encoder gives for a full window."""
        del modality, meta
        D = self.config.hidden_size
        most = int(audio_output_lengths(self.num_frames)[1])
        if embeds.ndim != 2 or embeds.shape[1] != D or not 1 <= embeds.shape[0] <= most:
            raise ValueError(
                f"audio embeddings must have shape (num_audio_tokens, hidden_size) = (n, {D}) "
                f"with 1 <= n <= {most} for this model (the audio tower + projector output of "
                f"one item); got {tuple(embeds.shape)}"
            )
        return {}

    def get_audio_features(self, features: jax.Array, mel_lengths: jax.Array) -> jax.Array:
        """features (B, mel, 2C), mel_lengths (B,) -> (B, C/2, D_text); rows past each
        item's token count are padding."""
        after_conv, _ = audio_output_lengths(mel_lengths)
        return self.multi_modal_projector(self.audio_tower(features, after_conv))

    def mm_encoder(self, graphdef):
        """A host function (params, modality, items) -> [features (n, D_text) per item], left
        on the device (`DeviceRows`, in the model's dtype); items hold `input_features`
        (mel, frames) and `feature_attention_mask` (frames,)."""

        @jax.jit
        def run(params, features, mel_lengths):
            return nnx.merge(graphdef, params).get_audio_features(features, mel_lengths)

        def encode(params, modality: str, items: list[dict]) -> list[DeviceRows]:
            del modality
            feats = np.stack([np.asarray(it["input_features"], np.float32) for it in items])
            lengths = np.array(
                [int(np.asarray(it["feature_attention_mask"]).sum()) for it in items], np.int32
            )
            out = []
            for i in range(0, len(feats), MAX_AUDIOS_PER_CALL):
                chunk, n = feats[i : i + MAX_AUDIOS_PER_CALL], lengths[i : i + MAX_AUDIOS_PER_CALL]
                B = next_pow2(len(chunk))  # bucket: one program per power of two
                padded = np.zeros((B, *chunk.shape[1:]), np.float32)
                padded[: len(chunk)] = chunk
                padded_n = np.full(B, chunk.shape[-1], np.int32)
                padded_n[: len(n)] = n
                rows = run(params, padded, padded_n)  # (B, C/2, D_text)
                per = rows.shape[1]
                flat = rows.reshape(-1, rows.shape[-1])  # (B * C/2, D_text)
                # each item's rows, padding trimmed: views of one array
                for j, mel in enumerate(n):
                    count = int(audio_output_lengths(int(mel))[1])
                    out.append(DeviceRows(flat, j * per, j * per + count))
            return out

        return encode
