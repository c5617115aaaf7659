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

4. Video: transformers' processor samples frames (2 per second by default) and writes each
   frame as `<{t:.1f} seconds><|vision_start|>` + its tokens + `<|vision_end|>`, t the
   frame pair's mean time (`multimodal/qwen3_video.py`). A video item's span here is that
   whole text (`mm_span_ids`, which the front end places over the video placeholder), and
   its encoder rows cover the span: the tower's rows at the video tokens, the text tokens'
   own embeddings (no DeepStack) elsewhere (`mm_encoder`). M-RoPE takes each frame as an
   image of one temporal patch, the text between frames as text (`mrope_positions`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.attention import AttentionMetadata
from jaxmm.layers.rope import rope_parameters
from jaxmm.models.device_rows import DeviceRows
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
    mm_modalities = ("image", "video")

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

    def mm_span_ids(self, modality: str, item: dict, encode_text) -> list[int] | None:
        """A video's span: each frame's time text, then its tokens between vision start and
        end (`Qwen3VLProcessor.replace_video_token`); None for images (their tokens only)."""
        if modality != "video":
            return None
        if item.get("timestamps") is None:
            raise ValueError("a Qwen3-VL video needs its frame times (a Qwen3-VL video processor)")
        c = self.hf_config
        t, h, w = item["grid_thw"]
        frame = [int(c.vision_start_token_id)]
        frame += [int(c.video_token_id)] * (h * w // self._merge() ** 2)
        frame += [int(c.vision_end_token_id)]
        if len(item["timestamps"]) != t:
            raise ValueError(f"{len(item['timestamps'])} frame times for {t} temporal patches")
        return [i for ts in item["timestamps"] for i in encode_text(f"<{ts:.1f} seconds>") + frame]

    def mm_num_tokens(self, modality: str, item: dict) -> int:
        n = super().mm_num_tokens(modality, item)  # checks the pixels' shape
        return len(item["span_ids"]) if modality == "video" else n

    def mrope_positions(self, num_tokens: int, spans: list) -> tuple[np.ndarray, int]:
        """Qwen2-VL's positions with each video frame taken as an image of one temporal
        patch and the time text around frames as text (transformers' `get_rope_index`)."""
        video = int(self.hf_config.video_token_id)
        flat = []
        for start, end, modality, meta in spans:
            span = meta.get("span_ids")
            if span is None:
                flat.append((start, end, modality, meta))
                continue
            _, h, w = meta["grid_thw"]
            n = h * w // self._merge() ** 2
            is_video = np.asarray(span) == video
            firsts = np.flatnonzero(is_video & ~np.concatenate([[False], is_video[:-1]]))
            flat += [(start + f, start + f + n, "image", {"grid_thw": (1, h, w)}) for f in firsts]
        return super().mrope_positions(num_tokens, flat)

    def mm_encoder(self, graphdef):
        """The tower's rows (`Qwen2VLForConditionalGeneration.mm_encoder`); a video's rows
        then spread over its span: tower rows at its video tokens, the text's embeddings
        (DeepStack columns zero) at its time text and vision start / end tokens."""
        encode = super().mm_encoder(graphdef)
        video = int(self.hf_config.video_token_id)

        @jax.jit
        def spread(params, rows, src, text_ids, is_video):
            text = nnx.merge(graphdef, params).embed(text_ids).astype(rows.dtype)  # (L, D)
            text = jnp.pad(text, ((0, 0), (0, rows.shape[1] - text.shape[1])))
            return jnp.where(is_video[:, None], rows[src], text)  # (L, W)

        def run(params, modality: str, items: list[dict]) -> list[DeviceRows]:
            out = []
            for f, item in zip(encode(params, modality, items), items, strict=True):
                span = item.get("span_ids") if modality == "video" else None
                if span is None:
                    out.append(f)
                    continue
                L = max(1 << (len(span) - 1).bit_length(), 16)  # a power-of-two bucket
                ids = np.zeros(L, np.int32)
                ids[: len(span)] = span
                is_video = ids == video
                is_video[len(span) :] = False
                src = np.zeros(L, np.int32)
                src[is_video] = f.start + np.arange(int(is_video.sum()))
                arr = spread(params, f.array, src, np.where(is_video, 0, ids), is_video)
                out.append(DeviceRows(arr, 0, len(span)))
            return out

        return run

    def mm_check_embeds(self, modality: str, embeds: np.ndarray, meta: dict) -> dict:
        if modality == "video":
            raise ValueError(
                "Qwen3-VL takes no precomputed video embeddings in jaxmm: a video's span holds "
                "its frame times as text, which embeddings do not carry; send the frames"
            )
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
