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
   text. Videos are plain `<|video_pad|>` runs (no Qwen3-VL time text). A prompt may mix
   audio with images and videos (the image front end places them all).
5. Video with its own audio track (`mm_processor_kwargs={"use_audio_in_video": True}`,
   each video paired with one audio item, in order): the video's placeholder becomes
   `<|audio_start|>` + the video's and the audio's tokens interleaved one by one in TMRoPE
   time (a video token first on a tie; audio token k is at time k) + `<|audio_end|>`
   (`Qwen3OmniMoeProcessor.replace_video_with_audio_token`; `mm_span_ids`). Positions as
   the thinker's `get_rope_index`: the start marker runs on like text, the video's (time,
   row, col) and the audio's sequential positions both start after it, in token order; the
   end marker takes the largest position of the span's last run of one kind + 1. The
   item's encoder rows cover the span (`mm_encoder`): tower rows at video tokens (with
   DeepStack), audio-tower rows at audio tokens, the markers' own embeddings.

Placeholders are the released tokenizer's: `<|vision_start|><|image_pad|><|vision_end|>`,
`<|vision_start|><|video_pad|><|vision_end|>`, `<|audio_start|><|audio_pad|><|audio_end|>`.
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

    # a video may carry its audio track (the front end pairs them under use_audio_in_video)
    mm_audio_in_video = True

    def mm_span_ids(self, modality: str, item: dict, encode_text) -> list[int] | None:
        """A video with its audio track (`item["audio"]`): `<|audio_start|>`, the two kinds
        of tokens interleaved by time, `<|audio_end|>`, as the processor writes them. None
        for other items (a plain run of their token; no Qwen3-VL frame times)."""
        if modality != "video" or "audio" not in item:
            return None
        (end,) = encode_text("<|audio_end|>")  # not in the thinker's config
        kinds = self._interleave(item, self.mm_num_tokens("audio", item["audio"]))
        video, audio = self.mm_token_id("video"), self.mm_token_id("audio")
        body = [video if k == "video" else audio for k in kinds]
        return [int(self.hf_config.audio_start_token_id), *body, int(end)]

    def _video_times(self, grid, seconds: float) -> np.ndarray:
        """TMRoPE time of each video token (float), in token order."""
        t, h, w = grid
        per_second = float(self.hf_config.position_id_per_seconds)
        return np.repeat(np.arange(t) * float(seconds) * per_second, h * w // self._merge() ** 2)

    def _interleave(self, item: dict, n_audio: int) -> list[str]:
        """Token kinds of a video with its audio, in time order (video first on a tie)."""
        times = self._video_times(item["grid_thw"], item.get("second_per_grid_t", 1.0))
        kinds, v, a = [], 0, 0
        while v < len(times) and a < n_audio:
            if times[v] <= a:
                kinds.append("video")
                v += 1
            else:
                kinds.append("audio")
                a += 1
        return kinds + ["video"] * (len(times) - v) + ["audio"] * (n_audio - a)

    def mrope_positions(self, num_tokens: int, spans: list) -> tuple[np.ndarray, int]:
        """Qwen2.5-Omni's TMRoPE positions (`_Omni25.mrope_positions`), with each video
        carrying its audio track laid out as the thinker's `get_rope_index` does."""
        plain, tracks = [], []
        for span in spans:
            (tracks if span[3].get("span_ids") is not None else plain).append(span)
        if not tracks:
            return _Omni25.mrope_positions(self, num_tokens, spans)
        pos = np.empty((3, num_tokens), np.int64)
        cursor, current = 0, 0  # next prompt index, next position
        for start, end, modality, meta in spans:
            if meta.get("span_ids") is None:  # text and plain items up to `end`
                part, _ = _Omni25.mrope_positions(
                    self, end - cursor, [(start - cursor, end - cursor, modality, meta)]
                )
                pos[:, cursor:end] = part + current
                current += int(part.max()) + 1
                cursor = end
                continue
            pos[:, cursor:start] = np.arange(start - cursor) + current
            current += start - cursor
            current = self._track_positions(pos, start, end, meta, current)
            cursor = end
        pos[:, cursor:] = np.arange(num_tokens - cursor) + current
        delta = int(pos.max()) + 1 - num_tokens if num_tokens else 0
        return pos, delta

    def _track_positions(self, pos: np.ndarray, start: int, end: int, meta: dict, st: int) -> int:
        """Fill pos[:, start:end] for a video with its audio track (`<|audio_start|>` to
        `<|audio_end|>`); returns the position of the text after it."""
        m = self._merge()
        span = np.asarray(meta["span_ids"])
        pos[:, start] = st  # <|audio_start|>: a text token
        st += 1
        t, h, w = meta["grid_thw"]
        seconds = np.float32(meta.get("second_per_grid_t", 1.0))
        per_second = np.float32(self.hf_config.position_id_per_seconds)
        tpos = (np.arange(t).astype(np.float32) * seconds * per_second).astype(np.int64)
        grid = np.stack(np.meshgrid(tpos, np.arange(h // m), np.arange(w // m), indexing="ij"))
        video = grid.reshape(3, -1) + st
        is_video = span[1:-1] == self.mm_token_id("video")
        n_audio = int((~is_video).sum())
        if int(is_video.sum()) != video.shape[1] or len(span) != end - start:
            raise ValueError(
                f"a video with its audio spans {end - start} tokens; it takes {len(span)}"
            )
        body = np.empty((3, len(is_video)), np.int64)
        body[:, is_video] = video
        body[:, ~is_video] = np.arange(n_audio) + st
        pos[:, start + 1 : end - 1] = body
        # the end marker follows the span's last run of one kind (transformers takes that
        # run's largest position, not the span's)
        last = len(is_video) - 1
        first = last
        while first > 0 and is_video[first - 1] == is_video[last]:
            first -= 1
        eos = int(body[:, first:].max()) + 1
        pos[:, end - 1] = eos
        return eos + 1

    # the front end hands Qwen3-Omni's audio as HF's processor does: padded to its own
    # length, any length (`Qwen3OmniMoeProcessor`: padding=True, truncation=False)
    audio_feature_kwargs = {"padding": "longest", "truncation": False}

    def mm_num_tokens(self, modality: str, item: dict) -> int:
        if modality != "audio":
            n = Qwen2VLForConditionalGeneration.mm_num_tokens(self, modality, item)
            return len(item["span_ids"]) if "audio" in item and "span_ids" in item else n
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
        video_id, audio_id = self.mm_token_id("video"), self.mm_token_id("audio")

        @jax.jit
        def spread(params, video, audio_rows, src, ids, kind):
            """(L, W) rows of a span: video rows, audio rows, the markers' embeddings."""
            text = nnx.merge(graphdef, params).embed(ids).astype(video.dtype)  # (L, D)
            text = jnp.pad(text, ((0, 0), (0, video.shape[1] - text.shape[1])))
            out = jnp.where((kind == 1)[:, None], video[src], text)
            return jnp.where((kind == 2)[:, None], audio_rows[src], out)

        def with_tracks(params, items: list[dict]) -> list[DeviceRows]:
            frames = vision(params, "video", items)
            tracks = audio(params, "audio", [it["audio"] for it in items])
            out = []
            for f, a, item in zip(frames, tracks, items, strict=True):
                span = np.asarray(item["span_ids"])
                L = max(1 << (len(span) - 1).bit_length(), 16)  # a power-of-two bucket
                kind = np.zeros(L, np.int32)
                kind[: len(span)] = np.where(span == video_id, 1, np.where(span == audio_id, 2, 0))
                src = np.zeros(L, np.int32)
                src[kind == 1] = f.start + np.arange(int((kind == 1).sum()))
                src[kind == 2] = a.start + np.arange(int((kind == 2).sum()))
                ids = np.zeros(L, np.int32)
                ids[: len(span)] = np.where(kind[: len(span)] == 0, span, 0)
                arr = spread(params, f.array, a.array, src, ids, kind)
                out.append(DeviceRows(arr, 0, len(span)))
            return out

        def encode(params, modality: str, items: list[dict]) -> list[DeviceRows]:
            if modality == "audio":
                return audio(params, modality, items)
            if modality != "video" or not any("audio" in it for it in items):
                return vision(params, modality, items)
            out: list = [None] * len(items)
            paired = [i for i, it in enumerate(items) if "audio" in it]
            alone = [i for i, it in enumerate(items) if "audio" not in it]
            for i, rows in zip(paired, with_tracks(params, [items[i] for i in paired])):
                out[i] = rows
            if alone:
                for i, rows in zip(alone, vision(params, modality, [items[i] for i in alone])):
                    out[i] = rows
            return out

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
