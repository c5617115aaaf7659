"""Voxtral: a Whisper encoder over 30 s windows + a two-layer projector -> a Llama decoder.

Audio (log-mel features over the whole clip padded to whole windows, as the HF processor
computes them, then cut into windows of `2 * max_source_positions` frames) -> Whisper
encoder per window, no mask (silence is part of the input) -> each run of
`intermediate_size / d_model` consecutive frames stacked into one row (4 for the released
checkpoints: 1500 frames -> 375 rows per 30 s) -> `multi_modal_projector` (linear_1, GELU,
linear_2, no biases) -> one row per `[AUDIO]` token. An item of n windows takes
n * rows-per-window placeholder tokens; the front end (`jaxmm.multimodal.audio_inputs`)
expands each placeholder and the engine's encoder stage encodes and splices the rows.
Text runs through Llama (`language_model`), paged as any decoder.

Weights: transformers saves `model.audio_tower.*`, `model.multi_modal_projector.*`,
`model.language_model.*`, `lm_head.*`; `hf_key_rules` fold them onto this module tree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.attention import AttentionMetadata
from jaxmm.layers.linear import Linear
from jaxmm.layers.mlp import activation
from jaxmm.models.device_rows import DeviceRows
from jaxmm.models.llama import LlamaForCausalLM
from jaxmm.models.llava import language_config
from jaxmm.models.whisper import WhisperEncoder, next_pow2


class VoxtralMultiModalProjector(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        Ds, Dt = config.audio_config.intermediate_size, config.text_config.hidden_size
        self.linear_1 = Linear(Ds, Dt, bias=False, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(Dt, Dt, bias=False, dtype=dtype, rngs=rngs)
        self.act = config.projector_hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(activation(self.act)(self.linear_1(x)))


class VoxtralForConditionalGeneration(nnx.Module):
    is_multimodal = True
    mm_modalities = ("audio",)
    uses_mrope = False
    # audio longer than one encoder window is padded to whole windows and split (the
    # front end's features are (windows, mel, frames))
    audio_windows = True
    hf_key_rules = (
        (r"^model\.language_model\.", "language_model.model."),
        (r"^model\.audio_tower\.", "audio_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^lm_head\.", "language_model.lm_head."),
    )

    def __init__(self, config, *, dtype=jnp.float32, attention_backend: str = "reference", rngs):
        self.hf_config = config
        self.config = text_config = language_config(config)
        ac = config.audio_config
        if ac.intermediate_size % ac.d_model or ac.max_source_positions % (
            ac.intermediate_size // ac.d_model
        ):
            raise ValueError(
                f"Voxtral stacks intermediate_size / d_model = {ac.intermediate_size} / "
                f"{ac.d_model} encoder frames per audio token; it must divide the "
                f"{ac.max_source_positions} frames of a window"
            )
        self.audio_tower = WhisperEncoder(ac, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = VoxtralMultiModalProjector(config, dtype=dtype, rngs=rngs)
        self.language_model = LlamaForCausalLM(
            text_config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        ignored = [r"rotary_emb\.inv_freq", r"position_ids$"]
        if text_config.tie_word_embeddings:
            ignored.append(r"^language_model\.lm_head\.weight$")
        self.ignored_hf_keys = tuple(ignored)
        self.num_frames = self.audio_tower.num_frames  # mel frames of one window
        self.stack = ac.intermediate_size // ac.d_model  # encoder frames per audio token
        self.tokens_per_window = ac.max_source_positions // self.stack

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
        return int(self.hf_config.audio_token_id)

    def mm_placeholder_text(self, modality: str) -> str:
        del modality
        return "[BEGIN_AUDIO][AUDIO]"

    def transcription_prompt_text(self, language: str | None) -> str:
        """The transcription request as mistral_common encodes it (after BOS): the audio in
        an instruction, then the language if known, then [TRANSCRIBE]."""
        lang = f"lang:{language}" if language else ""
        return f"[INST]{self.mm_placeholder_text('audio')}[/INST]{lang}[TRANSCRIBE]"

    def mm_num_tokens(self, modality: str, item: dict) -> int:
        """Rows an item gives: its windows times the rows of one window."""
        del modality
        windows, mel, frames = np.shape(item["input_features"])
        if frames != self.num_frames or mel != self.hf_config.audio_config.num_mel_bins:
            raise ValueError(
                f"audio features of shape {(mel, frames)} per window; this model's encoder "
                f"takes {(self.hf_config.audio_config.num_mel_bins, self.num_frames)}"
            )
        return windows * self.tokens_per_window

    def mm_check_embeds(self, modality: str, embeds: np.ndarray, meta: dict) -> dict:
        """Precomputed audio embeddings (the projector's rows of one item) must be
        (n, hidden_size), n a whole number of windows' rows."""
        del modality, meta
        D, per = self.config.hidden_size, self.tokens_per_window
        if embeds.ndim != 2 or embeds.shape[1] != D or not embeds.shape[0] or embeds.shape[0] % per:
            raise ValueError(
                f"audio embeddings must have shape (num_audio_tokens, hidden_size) = (n, {D}) "
                f"with n a multiple of {per} (the rows of one encoder window) for this model; "
                f"got {tuple(embeds.shape)}"
            )
        return {}

    def get_audio_features(self, features: jax.Array) -> jax.Array:
        """features (W, mel, 2C) windows -> (W, C / stack, D_text)."""
        x = self.audio_tower(features)  # (W, C, Da)
        W, C, Da = x.shape
        x = x.reshape(W, C // self.stack, self.stack * Da)  # consecutive frames side by side
        return self.multi_modal_projector(x)

    def mm_encoder(self, graphdef):
        """A host function (params, modality, items) -> [features (n, D_text) per item], left
        on the device (`DeviceRows`); items hold `input_features` (windows, mel, frames)."""

        @jax.jit
        def run(params, features):
            return nnx.merge(graphdef, params).get_audio_features(features)

        def encode(params, modality: str, items: list[dict]) -> list[DeviceRows]:
            del modality
            out = []
            for it in items:  # one call per item: its windows' rows stay contiguous
                feats = np.asarray(it["input_features"], np.float32)
                W = len(feats)
                padded = np.zeros((next_pow2(W), *feats.shape[1:]), np.float32)
                padded[:W] = feats  # bucket: one program per power of two of windows
                rows = run(params, padded)  # (B, per, D_text)
                flat = rows.reshape(-1, rows.shape[-1])
                out.append(DeviceRows(flat, 0, W * rows.shape[1]))
            return out

        return encode
