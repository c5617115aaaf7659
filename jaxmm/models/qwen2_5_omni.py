"""Qwen2.5-Omni's thinker: the Qwen2.5-VL vision tower and M-RoPE decoder, text out.

The thinker is Qwen2.5-VL's pieces under other names: the same windowed vision tower
(`encoders/qwen2_vl_vision.py`, its attention saved as separate q / k / v, fused here on
load), the same Qwen2 decoder with M-RoPE positions (`Qwen2VLTextModel`). Its config nests
`text_config` / `vision_config` / `audio_config` and spells the placeholders
`<|vision_bos|><|IMAGE|><|vision_eos|>`.

TMRoPE for images equals Qwen2-VL's M-RoPE: an image has one temporal patch (t = 0), its
tokens get (0, row, col) past the text before it, and the text after resumes at the
largest position + 1 (`max(h, w) / m` past the image's start), which is what
`Qwen2VLForConditionalGeneration.mrope_positions` computes.

Served modalities: images. The audio tower's weights are read past (audio and video,
with TMRoPE's time-interleaving, are not served yet). A full `Qwen2_5OmniForConditionalGeneration`
checkpoint is served through its thinker: `thinker.*` keys are this model's, the talker
and token2wav weights are skipped with one log line.
"""

from __future__ import annotations

import copy
import logging
import re

import numpy as np

from jaxmm.models.qwen2_vl import Qwen2_5_VLForConditionalGeneration

log = logging.getLogger(__name__)

# the vision tower's q / k / v, saved apart by the thinker, fused into `attn.qkv`
_VISION_QKV = re.compile(r"^(visual\.blocks\.\d+\.attn)\.(q|k|v)\.(weight|bias)$")


class Qwen2_5OmniThinkerForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    mm_modalities = ("image",)
    hf_key_rules = (
        (r"^thinker\.", ""),  # a full Omni checkpoint: the thinker's weights
        (r"^model\.language_model\.", "model."),
        (r"^model\.visual\.", "visual."),
    )
    ignored_hf_keys = (
        r"rotary_emb\.inv_freq",
        r"position_ids$",
        r"^audio_tower\.",  # audio is not served yet: its tower is not built
        r"^thinker\.audio_tower\.",
        r"^talker\.",  # speech output (text out only)
        r"^token2wav\.",
    )

    def __init__(self, config, **kwargs):
        thinker = getattr(config, "thinker_config", None)
        if thinker is not None:  # a full Omni config (`load_config` hands over the thinker's)
            config = thinker
        # the thinker's own flag decides (transformers ties by the top-level config; the
        # nested text config defaults to True and is not consulted)
        config = copy.copy(config)
        config.text_config = copy.copy(config.text_config)
        config.text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        super().__init__(config, **kwargs)

    def mm_token_id(self, modality: str) -> int:
        c = self.hf_config
        ids = {"image": c.image_token_id, "video": c.video_token_id, "audio": c.audio_token_id}
        return int(ids[modality])

    @staticmethod
    def hf_tensor_converter():
        """Fuses each vision block's q / k / v (weight and bias) into its `qkv`, in that
        order, once all three of a kind have been read; other tensors pass through."""
        pending: dict[tuple[str, str], dict[str, np.ndarray]] = {}

        def convert(key: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
            m = _VISION_QKV.match(re.sub(r"^thinker\.", "", key))
            if m is None:
                return [(key, array)]
            prefix, part, kind = m.groups()
            parts = pending.setdefault((prefix, kind), {})
            parts[part] = np.asarray(array)
            if len(parts) < 3:
                return []
            del pending[(prefix, kind)]
            fused = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
            return [(f"{prefix}.qkv.{kind}", fused)]

        return convert


class Qwen2_5OmniForConditionalGeneration(Qwen2_5OmniThinkerForConditionalGeneration):
    """A full Omni checkpoint (thinker + talker + token2wav), served through its thinker:
    its config is the thinker's (`weights.hf_config.served_config`), its `thinker.*`
    weights are this model's (`hf_key_rules`), the talker's and token2wav's are skipped."""

    def __init__(self, config, **kwargs):
        log.info(
            "Qwen2.5-Omni: serving the thinker (text output); the talker and token2wav "
            "(speech output) weights are skipped"
        )
        super().__init__(config, **kwargs)
