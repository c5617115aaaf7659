"""Qwen2.5-Omni's thinker: the Qwen2.5-VL vision tower and M-RoPE decoder, text out.

The thinker is Qwen2.5-VL's pieces under other names: the same windowed vision tower
(`encoders/qwen2_vl_vision.py`, its attention saved as separate q / k / v, fused here on
load), the same Qwen2 decoder with M-RoPE positions (`Qwen2VLTextModel`). Its config nests
`text_config` / `vision_config` / `audio_config` and spells the placeholders
`<|vision_bos|><|IMAGE|><|vision_eos|>`.

TMRoPE for images gives Qwen2-VL's M-RoPE positions: an image has one temporal patch (t = 0), its
tokens get (0, row, col) past the text before it, and the text after resumes at the
largest position + 1 (`max(h, w) / m` past the image's start), which is what
`Qwen2VLForConditionalGeneration.mrope_positions` computes.

Audio: Whisper's stem and layers on chunks of `2 * n_window` mel frames (attention and
positions restart per chunk), then pairs of rows averaged, `ln_post`, `proj` to the text
width; its tokens take plain sequential positions (TMRoPE gives audio alone no grid).
Video: the vision tower as for images; TMRoPE time in `position_id_per_seconds` units
(`mrope_positions`). A prompt may mix audio with images and videos (the image front end
places them all, the audio front end prepares the audio).

Video with its own audio track (`mm_processor_kwargs={"use_audio_in_video": True}`, each
video paired with one audio item, in order): the video's placeholder becomes
`<|audio_bos|>` + the video's and the audio's tokens interleaved in chunks of
`seconds_per_chunk` s of TMRoPE time + `<|audio_eos|>` (`Qwen2_5OmniProcessor.
replace_video_with_audio_token`; `mm_span_ids`). The item's encoder rows cover that span:
tower rows at the video tokens, audio-tower rows at the audio tokens, the two markers' own
embeddings (`mm_encoder`). Positions as the thinker's `get_rope_index`: both start markers
share one position, the video's (time, row, col) and the audio's sequential positions start
after it and are laid out chunk by chunk, both end markers take the last chunk's largest
position + 1 (`mrope_positions`).
A full `Qwen2_5OmniForConditionalGeneration` checkpoint is served through its thinker:
`thinker.*` keys are this model's, the talker and token2wav weights are skipped with one
log line.
"""

from __future__ import annotations

import copy
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.linear import Linear
from jaxmm.layers.mlp import activation
from jaxmm.models.device_rows import DeviceRows
from jaxmm.models.encoders.clip import LayerNorm
from jaxmm.models.qwen2_audio import audio_output_lengths
from jaxmm.models.qwen2_vl import Qwen2_5_VLForConditionalGeneration
from jaxmm.models.whisper import Conv1d, WhisperEncoderLayer, next_pow2

log = logging.getLogger(__name__)

# the vision tower's q / k / v, saved apart by the thinker, fused into `attn.qkv`
_VISION_QKV = re.compile(r"^(visual\.blocks\.\d+\.attn)\.(q|k|v)\.(weight|bias)$")


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """(length, channels) float32 [sin | cos] position table, as transformers computes it
    (float32 timescales); not a weight of the checkpoint."""
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(np.float32(-increment) * np.arange(channels // 2, dtype=np.float32))
    scaled = np.arange(length, dtype=np.float32)[:, None] * inv[None, :].astype(np.float32)
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


class Qwen2_5OmniAudioEncoder(nnx.Module):
    """The thinker's audio tower: Whisper's stem and layers run on chunks of `2 * n_window`
    mel frames, each chunk on its own (attention and positions restart per chunk), then the
    item's rows back to back are averaged in pairs, normed and projected to the text width.

    A call takes chunks (N, mel, 2W) zero-padded past each chunk's frames and their lengths
    (N,); `pairs` (2, M) index the rows (N * W) averaged into each output row.
    """

    def __init__(self, config, *, dtype, rngs):
        D = config.d_model
        self.conv1 = Conv1d(config.num_mel_bins, D, 3, 1, dtype=dtype)
        self.conv2 = Conv1d(D, D, 3, 2, dtype=dtype)
        self.layers = nnx.List(
            [
                WhisperEncoderLayer(config, dtype=dtype, rngs=rngs)
                for _ in range(config.encoder_layers)
            ]
        )
        self.ln_post = LayerNorm(D, dtype=dtype)
        self.proj = Linear(D, config.output_dim, bias=True, dtype=dtype, rngs=rngs)
        self.window = int(config.n_window)
        self.positions = tuple(map(tuple, sinusoids(self.window, D).tolist()))

    def __call__(self, chunks: jax.Array, lengths: jax.Array, pairs: jax.Array) -> jax.Array:
        """chunks (N, mel, 2W), lengths (N,) frames, pairs (2, M) -> (M, D_out)."""
        gelu = activation("gelu")
        frames = chunks.shape[-1]
        real = (jnp.arange(frames)[None, :] < lengths[:, None])[:, None, :]  # (N, 1, 2W)
        # the stem sees zeros past a chunk's frames, after conv1 too (transformers masks there)
        x = gelu(self.conv1(chunks)) * real.astype(chunks.dtype)
        x = gelu(self.conv2(x)).transpose(0, 2, 1)  # (N, W, D)
        N, W, D = x.shape
        x = x + jnp.asarray(np.array(self.positions, np.float32), x.dtype)[None, :W]
        keep = jnp.arange(W)[None, :] < ((lengths - 1) // 2 + 1)[:, None]  # (N, W)
        bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        rows = x.reshape(N * W, D)
        pooled = (rows[pairs[0]] + rows[pairs[1]]) / 2  # AvgPool1d(2, 2) over an item's rows
        return self.proj(self.ln_post(pooled))


def audio_chunks(features: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """One item's valid log-mel frames (mel, L) -> chunks (n, mel, 2W) zero-padded, and
    each chunk's frame count (n,)."""
    mel, L = features.shape
    size = 2 * window
    n = max(1, -(-L // size))
    out = np.zeros((n, mel, size), np.float32)
    lengths = np.zeros(n, np.int32)
    for i in range(n):
        part = features[:, i * size : (i + 1) * size]
        out[i, :, : part.shape[1]] = part
        lengths[i] = part.shape[1]
    return out, lengths


def chunk_bounds(times: np.ndarray, per_chunk: int) -> list[tuple[int, int]]:
    """[start, end) runs of rising times, cut before each time that reaches the next
    multiple of `per_chunk` (transformers' `get_chunked_index`). Each token cuts at most
    once, so a jump over several multiples leaves one-token chunks after it until the
    multiples catch up: chunk j of one kind need not cover chunk j's time of the other."""
    bounds, start, k = [], 0, 1
    for i, t in enumerate(times):
        if t >= k * per_chunk:
            bounds.append((start, i))
            start, k = i, k + 1
    bounds.append((start, len(times)))
    return bounds


def interleaved_chunks(
    video_times: np.ndarray, num_audio: int, per_chunk: int
) -> list[tuple[str, int, int]]:
    """("video" | "audio", start, end) runs of a video's tokens (their TMRoPE times, in
    token order) and its audio's tokens (time = index), alternating chunk by chunk, video
    first; the kind with more chunks runs on alone."""
    video = chunk_bounds(video_times, per_chunk)
    audio = chunk_bounds(np.arange(num_audio), per_chunk)
    out = []
    for j in range(max(len(video), len(audio))):
        if j < len(video):
            out.append(("video", *video[j]))
        if j < len(audio):
            out.append(("audio", *audio[j]))
    return out


class Qwen2_5OmniThinkerForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    mm_modalities = ("image", "video", "audio")
    hf_key_rules = (
        (r"^thinker\.", ""),  # a full Omni checkpoint: the thinker's weights
        (r"^model\.language_model\.", "model."),
        (r"^model\.visual\.", "visual."),
    )
    ignored_hf_keys = (
        r"rotary_emb\.inv_freq",
        r"position_ids$",
        r"audio_tower\.audio_bos_eos_token\.",  # not used by the thinker's forward
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
        dtype = kwargs.get("dtype", jnp.float32)
        rngs = kwargs["rngs"]
        self.audio_tower = Qwen2_5OmniAudioEncoder(config.audio_config, dtype=dtype, rngs=rngs)

    def mm_placeholder_text(self, modality: str) -> str:
        """The placeholder a chat part or prompt puts where an item goes (Omni's tokens)."""
        if modality == "audio":
            return "<|audio_bos|><|AUDIO|><|audio_eos|>"
        if modality == "video":
            return "<|vision_bos|><|VIDEO|><|vision_eos|>"
        return "<|vision_bos|><|IMAGE|><|vision_eos|>"

    # a video may carry its audio track (the front end pairs them under use_audio_in_video)
    mm_audio_in_video = True

    def mm_prompt_processor_kwargs(self, modalities: list[str]) -> dict:
        """Frames that come without a rate are taken at 2 fps, as `Qwen2_5OmniProcessor`
        takes every video whose fps it is not told (a video's temporal patch then lasts
        1 s of TMRoPE time)."""
        del modalities
        return {"unknown_video_fps": 2.0}

    def _chunk_tokens(self) -> int:
        c = self.hf_config
        return int(c.position_id_per_seconds * c.seconds_per_chunk)

    def mm_span_ids(self, modality: str, item: dict, encode_text) -> list[int] | None:
        """A video with its audio track (`item["audio"]`): `<|audio_bos|>`, the video's and
        the audio's tokens interleaved by time, `<|audio_eos|>`, as the processor writes
        them (times in float64 there, not truncated). None for other items."""
        del encode_text
        if modality != "video" or "audio" not in item:
            return None
        c = self.hf_config
        t, h, w = item["grid_thw"]
        seconds = float(item.get("second_per_grid_t", 1.0))
        times = np.arange(t) * seconds * float(c.position_id_per_seconds)
        times = np.repeat(times, h * w // self._merge() ** 2)
        n_audio = self.mm_num_tokens("audio", item["audio"])
        ids = [int(c.audio_start_token_id)]
        for kind, a, b in interleaved_chunks(times, n_audio, self._chunk_tokens()):
            ids += [self.mm_token_id(kind)] * (b - a)
        return ids + [int(c.audio_end_token_id)]

    def _audio_in_video_positions(
        self, pos: np.ndarray, start: int, end: int, meta: dict, current: int
    ) -> int:
        """Fill pos[:, start:end] for a video with its audio track (span from `<|audio_bos|>`
        to `<|audio_eos|>`); returns the position of the text after it (the `<|vision_eos|>`
        shares the `<|audio_eos|>`'s)."""
        m = self._merge()
        per_second = np.float32(self.hf_config.position_id_per_seconds)
        bos = max(current - 1, 0)  # shared with the <|vision_bos|> before the span
        pos[:, start] = bos
        st = bos + 1
        t, h, w = meta["grid_thw"]
        seconds = np.float32(meta.get("second_per_grid_t", 1.0))
        tpos = (np.arange(t).astype(np.float32) * seconds * per_second).astype(np.int64)
        grid = np.stack(np.meshgrid(tpos, np.arange(h // m), np.arange(w // m), indexing="ij"))
        video = grid.reshape(3, -1) + st
        n_audio = int(np.sum(np.asarray(meta["span_ids"]) == self.mm_token_id("audio")))
        audio = np.broadcast_to(np.arange(n_audio) + st, (3, n_audio))
        # the model chunks the truncated times (the processor the float ones): positions are
        # laid out in the model's chunk order, whatever the tokens' order
        pieces = [
            (video if kind == "video" else audio)[:, a:b]
            for kind, a, b in interleaved_chunks(video[0] - st, n_audio, self._chunk_tokens())
        ]
        middle = np.concatenate(pieces, axis=1)
        if middle.shape[1] != end - start - 2:
            raise ValueError(
                f"a video with its audio spans {end - start} tokens; its grid {(t, h, w)} and "
                f"{n_audio} audio tokens take {middle.shape[1] + 2}"
            )
        pos[:, start + 1 : end - 1] = middle
        eos = int(pieces[-1].max()) + 1  # after the last chunk laid out, as transformers
        pos[:, end - 1] = eos
        return eos

    def mrope_positions(self, num_tokens: int, spans: list) -> tuple[np.ndarray, int]:
        """TMRoPE prompt positions (3, L) and the decode delta (transformers' thinker
        `get_rope_index`): an image or video's tokens get (time, row, col) past the text
        before it, time in `position_id_per_seconds` units (a video's temporal patch lasts
        `second_per_grid_t` s), and what follows resumes at the item's largest position + 1;
        audio tokens run on like text."""
        m = self._merge()
        per_second = np.float32(self.hf_config.position_id_per_seconds)
        pos = np.empty((3, num_tokens), np.int64)
        cursor, current = 0, 0  # next prompt index, next position
        for start, end, modality, meta in spans:
            pos[:, cursor:start] = np.arange(start - cursor) + current
            current += start - cursor
            if modality == "audio":
                pos[:, start:end] = np.arange(end - start) + current
                current += end - start
                cursor = end
                continue
            if meta.get("span_ids") is not None:  # a video with its audio track
                current = self._audio_in_video_positions(pos, start, end, meta, current)
                cursor = end
                continue
            t, h, w = meta["grid_thw"]
            seconds = np.float32(meta.get("second_per_grid_t", 1.0) if modality == "video" else 1)
            # float32 like transformers' tensors, then truncated by .long()
            tpos = (np.arange(t).astype(np.float32) * seconds * per_second).astype(np.int64)
            grid = np.stack(np.meshgrid(tpos, np.arange(h // m), np.arange(w // m), indexing="ij"))
            pos[:, start:end] = grid.reshape(3, -1) + current
            current += int(grid.max()) + 1
            cursor = end
        pos[:, cursor:] = np.arange(num_tokens - cursor) + current
        delta = int(pos.max()) + 1 - num_tokens if num_tokens else 0
        return pos, delta

    def mm_num_tokens(self, modality: str, item: dict) -> int:
        if modality != "audio":
            n = super().mm_num_tokens(modality, item)  # checks the pixels' shape
            return len(item["span_ids"]) if "audio" in item else n
        frames = int(np.asarray(item["feature_attention_mask"]).sum())
        return int(audio_output_lengths(frames)[1])

    def mm_check_embeds(self, modality: str, embeds: np.ndarray, meta: dict) -> dict:
        """Precomputed audio embeddings (one item's audio tower output) must be
        (n, hidden_size); image embeddings as Qwen2.5-VL's (with their grid)."""
        if modality != "audio":
            return super().mm_check_embeds(modality, embeds, meta)
        D = self.config.hidden_size
        if embeds.ndim != 2 or embeds.shape[1] != D or embeds.shape[0] < 1:
            raise ValueError(
                f"audio embeddings must have shape (num_audio_tokens, hidden_size) = (n, {D}) "
                f"for this model (the audio tower output of one item); got {tuple(embeds.shape)}"
            )
        return {}

    def mm_encoder(self, graphdef):
        """Images through the Qwen2.5-VL tower (`Qwen2VLForConditionalGeneration`), audio
        through `audio_encoder`; a video with its audio track through both, its rows then
        woven over its span (tower rows, audio rows, the markers' embeddings)."""
        images, audio = super().mm_encoder(graphdef), self.audio_encoder(graphdef)
        video_id, audio_id = self.mm_token_id("video"), self.mm_token_id("audio")

        @jax.jit
        def weave(params, vision, sound, ids, src, kind):
            text = nnx.merge(graphdef, params).embed(ids).astype(vision.dtype)  # (L, D)
            rows = jnp.where((kind == 1)[:, None], vision[src], text)
            return jnp.where((kind == 2)[:, None], sound[src], rows)

        def woven(params, vision: DeviceRows, sound: DeviceRows, span: list[int]) -> DeviceRows:
            L = max(next_pow2(len(span)), 16)  # a power-of-two bucket
            ids = np.zeros(L, np.int32)
            ids[: len(span)] = span
            kind = np.where(ids == video_id, 1, np.where(ids == audio_id, 2, 0)).astype(np.int32)
            kind[len(span) :] = 0
            src = np.zeros(L, np.int32)
            src[kind == 1] = vision.start + np.arange(int((kind == 1).sum()))
            src[kind == 2] = sound.start + np.arange(int((kind == 2).sum()))
            text_ids = np.where(kind == 0, ids, 0)
            return DeviceRows(
                weave(params, vision.array, sound.array, text_ids, src, kind), 0, len(span)
            )

        def encode(params, modality: str, items: list[dict]) -> list[DeviceRows]:
            if modality == "audio":
                return audio(params, modality, items)
            rows = images(params, modality, items)
            joint = [i for i, it in enumerate(items) if "audio" in it]
            if joint:
                tracks = audio(params, "audio", [items[i]["audio"] for i in joint])
                for i, track in zip(joint, tracks, strict=True):
                    rows[i] = woven(params, rows[i], track, items[i]["span_ids"])
            return rows

        return encode

    def audio_encoder(self, graphdef):
        """Items hold `input_features` (mel, frames) and `feature_attention_mask` (frames,);
        their valid frames are cut in chunks, the chunks of all items run in one call padded
        to a power of two (so are the output rows), each item's rows left on the device."""
        window = int(self.hf_config.audio_config.n_window)

        @jax.jit
        def run(params, chunks, lengths, pairs):
            return nnx.merge(graphdef, params).audio_tower(chunks, lengths, pairs)

        def encode(params, modality: str, items: list[dict]) -> list[DeviceRows]:
            del modality
            chunks, lengths, pairs, counts, base = [], [], [], [], 0
            for it in items:
                mask = np.asarray(it["feature_attention_mask"]).astype(bool)
                c, n = audio_chunks(np.asarray(it["input_features"], np.float32)[:, mask], window)
                # the item's rows after the stem, back to back, as flat indices into (N * W)
                rows = np.concatenate(
                    [base + i * window + np.arange((k - 1) // 2 + 1) for i, k in enumerate(n)]
                )
                m = len(rows) // 2
                pairs.append(np.stack([rows[0 : 2 * m : 2], rows[1 : 2 * m : 2]]))
                chunks.append(c)
                lengths.append(n)
                counts.append(m)
                base += len(c) * window
            chunks, lengths, pairs = map(np.concatenate, (chunks, lengths, [p.T for p in pairs]))
            N, M = len(chunks), len(pairs)
            padded = np.zeros((next_pow2(N), *chunks.shape[1:]), np.float32)
            padded[:N] = chunks
            padded_n = np.ones(len(padded), np.int32)  # padding chunks: one frame, ignored
            padded_n[:N] = lengths
            padded_pairs = np.zeros((2, next_pow2(M)), np.int32)
            padded_pairs[:, :M] = pairs.T
            out = run(params, padded, padded_n, padded_pairs)  # (M', D_text)
            starts = np.cumsum(counts) - counts
            return [DeviceRows(out, int(s), int(s) + n) for s, n in zip(starts, counts)]

        return encode

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
