"""Qwen3-Omni-MoE's thinker: Qwen3-VL-MoE's vision and decoder, its own audio tower, text out.

The thinker is assembled from pieces jaxmm has:

1. Vision: the Qwen3-VL tower with DeepStack (`encoders/qwen3_vl_vision.py`); its mergers
   are saved as `ln_q` / `mlp.0` / `mlp.2` and the DeepStack ones as `merger_list.*`,
   renamed on load (`hf_key_rules`).
2. Decoder: Qwen3-VL's (interleaved M-RoPE, DeepStack additions after the first layers,
   q/k norms) with Qwen3-MoE's decoder layers (`qwen3_moe.py`: the router honours
   `norm_topk_prob`, dense layers per `mlp_only_layers`); experts load per expert or fused
   (`weights/experts.py`).
3. Audio: `encoders/qwen3_omni_audio.py` (three stride-2 Conv2d, windowed attention, no
   pooling); an item of L mel frames takes 13 tokens per full 100-frame chunk plus the
   rows of its last chunk. Its rows are spliced like an image's; their DeepStack columns
   are zero (transformers adds DeepStack features at visual tokens only).
4. Positions: TMRoPE as Qwen2.5-Omni's thinker computes them
   (`Qwen2_5OmniThinkerForConditionalGeneration.mrope_positions`): an image or video's
   tokens get (time, row, col) past the text before it, time in `position_id_per_seconds`
   units, and what follows resumes at the item's largest position + 1; audio runs on like
   text. Videos are plain `<|video_pad|>` runs (no Qwen3-VL time text).

Placeholders are the released tokenizer's: `<|vision_start|><|image_pad|><|vision_end|>`,
`<|vision_start|><|video_pad|><|vision_end|>`, `<|audio_start|><|audio_pad|><|audio_end|>`.
Not served: `use_audio_in_video` (a video's own audio track interleaved with its frames).
Video times that fall between integers (a rate that does not divide `temporal_patch_size *
position_id_per_seconds`) are truncated: transformers keeps them as float positions, jaxmm's
positions are integers.

A full `Qwen3OmniMoeForConditionalGeneration` checkpoint is served through its thinker:
`thinker.*` keys are this model's, the talker and code2wav weights are skipped with one
log line (`weights.hf_config.served_config` hands over the thinker's config).
"""

from __future__ import annotations

import copy
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.moe import num_experts
from jaxmm.models.device_rows import DeviceRows
from jaxmm.models.encoders.qwen3_omni_audio import Qwen3OmniMoeAudioEncoder, conv_rows, pack_audio
from jaxmm.models.qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration as _Omni25
from jaxmm.models.qwen2_vl import Qwen2VLForConditionalGeneration
from jaxmm.models.qwen3_moe import Qwen3MoeDecoderLayer
from jaxmm.models.qwen3_vl import Qwen3VLForConditionalGeneration, Qwen3VLTextModel
from jaxmm.weights.experts import ExpertStacker

log = logging.getLogger(__name__)


class Qwen3OmniMoeThinkerTextModel(Qwen3VLTextModel):
    layer_cls = Qwen3MoeDecoderLayer


def audio_num_tokens(frames: int, n_window: int) -> int:
    """Rows the audio tower gives for `frames` valid mel frames (chunks of 2 * n_window)."""
    size = 2 * n_window
    full, rest = divmod(int(frames), size)
    return full * conv_rows(size) + (conv_rows(rest) if rest else 0)


class Qwen3OmniMoeThinkerForConditionalGeneration(Qwen3VLForConditionalGeneration):
    model_cls = Qwen3OmniMoeThinkerTextModel
    mm_modalities = ("image", "video", "audio")
    hf_key_rules = (
        (r"^thinker\.", ""),  # a full Omni checkpoint: the thinker's weights
        (r"^model\.language_model\.", "model."),
        (r"^model\.visual\.", "visual."),
        (r"^visual\.merger_list\.", "visual.deepstack_merger_list."),
        (r"^(visual\.(?:deepstack_merger_list\.\d+|merger))\.ln_q\.", r"\1.norm."),
        (r"^(visual\.(?:deepstack_merger_list\.\d+|merger))\.mlp\.0\.", r"\1.linear_fc1."),
        (r"^(visual\.(?:deepstack_merger_list\.\d+|merger))\.mlp\.2\.", r"\1.linear_fc2."),
    )
    ignored_hf_keys = (
        r"rotary_emb\.inv_freq",
        r"position_ids$",
        # a key bias adds the same q.b to every logit of a query row: softmax ignores it
        r"^audio_tower\.layers\.\d+\.self_attn\.k_proj\.bias$",
        r"^talker\.",  # speech output (text out only)
        r"^code2wav\.",
    )

    def __init__(self, config, **kwargs):
        thinker = getattr(config, "thinker_config", None)
        if thinker is not None:  # a full Omni config (`served_config` hands over the thinker's)
            config = thinker
        # the thinker's own flag decides (the nested text config's default is not consulted)
        config = copy.copy(config)
        config.text_config = copy.copy(config.text_config)
        config.text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        super().__init__(config, **kwargs)
        ac = config.audio_config
        if int(ac.output_dim) != int(self.config.hidden_size):
            raise ValueError(
                f"audio output_dim {ac.output_dim} must equal the text hidden_size "
                f"{self.config.hidden_size}"
            )
        dtype = kwargs.get("dtype", jnp.float32)
        self.audio_tower = Qwen3OmniMoeAudioEncoder(ac, dtype=dtype, rngs=kwargs["rngs"])

    # -- the multimodal contract -----------------------------------------------------------
    def mm_placeholder_text(self, modality: str) -> str:
        """The placeholder a chat part or prompt puts where an item goes."""
        if modality == "audio":
            return "<|audio_start|><|audio_pad|><|audio_end|>"
        if modality == "video":
            return "<|vision_start|><|video_pad|><|vision_end|>"
        return "<|vision_start|><|image_pad|><|vision_end|>"

    def mm_token_id(self, modality: str) -> int:
        c = self.hf_config
        ids = {"image": c.image_token_id, "video": c.video_token_id, "audio": c.audio_token_id}
        return int(ids[modality])

    def mm_span_ids(self, modality: str, item: dict, encode_text) -> list[int] | None:
        return None  # every item is a plain run of its token (no Qwen3-VL frame times)

    mrope_positions = _Omni25.mrope_positions
    # the front end hands Qwen3-Omni's audio as HF's processor does: padded to its own
    # length, any length (`Qwen3OmniMoeProcessor`: padding=True, truncation=False)
    audio_feature_kwargs = {"padding": "longest", "truncation": False}

    def mm_num_tokens(self, modality: str, item: dict) -> int:
        if modality != "audio":
            return Qwen2VLForConditionalGeneration.mm_num_tokens(self, modality, item)
        frames = int(np.asarray(item["feature_attention_mask"]).sum())
        return audio_num_tokens(frames, int(self.hf_config.audio_config.n_window))

    def mm_check_embeds(self, modality: str, embeds: np.ndarray, meta: dict) -> dict:
        """Audio: the audio tower's output of one item, (n, hidden_size). Images and videos:
        the merger's and each DeepStack level's rows, concatenated, with their grid."""
        if modality == "audio":
            D = self.config.hidden_size
            if embeds.ndim != 2 or embeds.shape[1] != D or embeds.shape[0] < 1:
                raise ValueError(
                    f"audio embeddings must have shape (num_audio_tokens, hidden_size) = "
                    f"(n, {D}) for this model (the audio tower output of one item); "
                    f"got {tuple(embeds.shape)}"
                )
            return {}
        return super().mm_check_embeds("image", embeds, meta)

    def mm_encoder(self, graphdef):
        """Images and videos through the Qwen3-VL tower, audio through `audio_encoder`."""
        vision = Qwen2VLForConditionalGeneration.mm_encoder(self, graphdef)
        audio = self.audio_encoder(graphdef)

        def encode(params, modality: str, items: list[dict]) -> list[DeviceRows]:
            return (audio if modality == "audio" else vision)(params, modality, items)

        return encode

    def audio_encoder(self, graphdef):
        """Items hold `input_features` (mel, frames) and `feature_attention_mask` (frames,);
        all items run in one call (`pack_audio`), their rows widened with zero DeepStack
        columns to the encoder cache's width and left on the device."""
        ac = self.hf_config.audio_config
        width = self.mm_row_width

        @jax.jit
        def run(params, chunks, pad_to, rows, valid, order):
            out = nnx.merge(graphdef, params).audio_tower(chunks, pad_to, rows, valid, order)
            return jnp.pad(out, ((0, 0), (0, width - out.shape[1])))

        def encode(params, modality: str, items: list[dict]) -> list[DeviceRows]:
            del modality
            feats = []
            for it in items:
                mask = np.asarray(it["feature_attention_mask"]).astype(bool)
                feats.append(np.asarray(it["input_features"], np.float32)[:, mask])
            b = pack_audio(feats, int(ac.n_window), int(ac.n_window_infer))
            out = run(params, b["chunks"], b["pad_to"], b["rows"], b["valid"], b["order"])
            counts = b["counts"]
            starts = np.cumsum(counts) - counts
            return [DeviceRows(out, int(s), int(s) + n) for s, n in zip(starts, counts)]

        return encode

    def hf_tensor_converter(self) -> ExpertStacker:
        """Stacks per-expert tensors (or splits fused ones) as the loader streams them."""
        return ExpertStacker(num_experts(self.config))


class Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeThinkerForConditionalGeneration):
    """A full Omni checkpoint (thinker + talker + code2wav), served through its thinker."""

    def __init__(self, config, **kwargs):
        log.info(
            "Qwen3-Omni: serving the thinker (text output); the talker and code2wav "
            "(speech output) weights are skipped"
        )
        super().__init__(config, **kwargs)
