"""Qwen3-VL: a Qwen3 decoder (q/k RMSNorm) with interleaved M-RoPE, DeepStack and the
Qwen3-VL vision tower (`encoders/qwen3_vl_vision.py`).

What differs from Qwen2-VL (`qwen2_vl.py`, whose multimodal contract, packing and M-RoPE
positions this reuses):

1. Interleaved M-RoPE: frequency i of the H/2 rotates with the height position when
   i % 3 == 1 and i < 3 * mrope_section[1], with the width position when i % 3 == 2 and
   i < 3 * mrope_section[2], else with the temporal one (transformers'
   `Qwen3VLTextRotaryEmbedding.recomposition_frequencies`), where Qwen2-VL gives each
   position a contiguous chunk.
2. DeepStack: the tower also returns the merged features of a few of its blocks; the k-th
   is added to the hidden states at the visual tokens after decoder layer k. An item's rows
   in the encoder cache carry them next to its embedding, (n, D * (1 + k)) (`mm_row_width`);
   the runner splices the first D columns over the placeholder tokens and passes the rest
   as `mm_extra` (zero at text tokens, so adding it there changes nothing). Chunked prefill
   and cache hits need nothing more: a token's additions travel with its row.
3. Weights: transformers saves `model.language_model.*`, `model.visual.*`, `lm_head.*`.

Videos (per-frame timestamp text between the frames) are not served yet: this model takes
images only, and says so when given a video.
"""

from __future__ import annotations

import numpy as np

from jaxmm.layers.attention import AttentionMetadata
from jaxmm.layers.rope import rope_parameters
from jaxmm.models.encoders.qwen3_vl_vision import Qwen3VLVisionModel, pack_with_taps
from jaxmm.models.llama import LlamaModel, head_dim
from jaxmm.models.qwen2_vl import Qwen2VLForConditionalGeneration, Qwen2VLTextModel
from jaxmm.models.qwen3 import Qwen3DecoderLayer


def interleaved_mrope_rows(half: int, section) -> tuple[int, ...]:
    """Which position row (0 t, 1 h, 2 w) rotates each of the H/2 frequencies."""
    rows = np.zeros(half, np.int64)
    for axis in (1, 2):
        rows[axis : 3 * int(section[axis]) : 3] = axis
    return tuple(int(r) for r in rows)


class Qwen3VLTextModel(Qwen2VLTextModel):
    layer_cls = Qwen3DecoderLayer

    def __init__(self, config, *, dtype, attention_backend: str, rngs):
        LlamaModel.__init__(
            self, config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        section = list(rope_parameters(config).get("mrope_section") or [24, 20, 20])
        self.mrope_rows = interleaved_mrope_rows(head_dim(config) // 2, section)

    def __call__(
        self, input_ids, kv_caches, md: AttentionMetadata, inputs_embeds=None, mm_extra=None
    ):
        """mm_extra: (T, D * k) DeepStack additions (zero away from visual tokens), or None."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (T, D)
        D = x.shape[-1]
        levels = 0 if mm_extra is None else mm_extra.shape[-1] // D
        cos, sin = self.rotary(md.positions)
        new_caches = []
        for i, (layer, kv_pages) in enumerate(zip(self.layers, kv_caches)):
            x, kv_pages = layer(x, cos, sin, kv_pages, md)
            if i < levels:  # DeepStack: level i after layer i
                x = x + mm_extra[:, i * D : (i + 1) * D].astype(x.dtype)
            new_caches.append(kv_pages)
        return self.norm(x), new_caches


class Qwen3VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    model_cls = Qwen3VLTextModel
    vision_cls = Qwen3VLVisionModel
    mm_modalities = ("image",)

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        vc = config.vision_config
        if int(vc.out_hidden_size) != int(self.config.hidden_size):
            raise ValueError(
                f"vision out_hidden_size {vc.out_hidden_size} must equal the text hidden_size "
                f"{self.config.hidden_size}"
            )
        # width of an item's rows in the encoder cache: embedding + DeepStack levels
        self.mm_row_width = self.vision_cls.out_width(vc)

    def __call__(
        self, input_ids, kv_caches, md: AttentionMetadata, inputs_embeds=None, mm_extra=None
    ):
        return self.model(input_ids, kv_caches, md, inputs_embeds, mm_extra)

    def pack_items(self, chunk: list[tuple]) -> dict:
        return pack_with_taps(chunk, self.hf_config.vision_config)

    def mm_num_tokens(self, modality: str, item: dict) -> int:
        if modality != "image":
            raise ValueError(f"{type(self).__name__} takes images only in jaxmm, not {modality}")
        return super().mm_num_tokens(modality, item)

    def mm_check_embeds(self, modality: str, embeds: np.ndarray, meta: dict) -> dict:
        grid = meta.get("grid_thw")
        W, levels = self.mm_row_width, len(self.hf_config.vision_config.deepstack_visual_indexes)
        if grid is None:
            raise ValueError(
                f"{modality} embeddings for this model need their grid: pass "
                f"{{'{modality}_embeds': (n, {W}) array, '{modality}_grid_thw': (t, h, w)}}"
            )
        want = (self._tokens(grid), W)
        if embeds.ndim != 2 or tuple(embeds.shape) != want:
            raise ValueError(
                f"{modality} embeddings with grid_thw {tuple(grid)} must have shape "
                f"(t*h*w/{self._merge() ** 2}, hidden_size * (1 + {levels} DeepStack levels)) = "
                f"{want}: the merger's output and each DeepStack level's, concatenated; "
                f"got {tuple(embeds.shape)}"
            )
        return dict(meta)
