"""Qwen2-VL and Qwen2.5-VL: a Qwen2 decoder with M-RoPE + a packed vision transformer.

M-RoPE: every token carries three positions (t, h, w); the rotary frequencies are split
in `mrope_section` chunks, chunk i rotated by position row i % 3. Text tokens have three
equal positions; an image/video's tokens get (t, row, col) of their merged patch, offset
by the text before them; text after an item resumes at max(h, w) / m past its start
(`mrope_positions`, transformers' `get_rope_index`). Decode positions are
`index + delta` on all rows. Positions come in `md.positions` (3, T); a (T,) array (text
only batches, warmup) means three equal rows.

Qwen2.5-VL differs in the tower (window attention, RMSNorm, gated MLP: see
`encoders/qwen2_vl_vision.py`) and in video time: temporal positions advance
`tokens_per_second * second_per_grid_t` per temporal patch instead of 1.

Weights: transformers saves `model.*` (text), `visual.*`, `lm_head.*`, which is this
module tree; `hf_key_rules` also accept `model.language_model.*` / `model.visual.*`.
The multimodal contract is documented in `llava.py`.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.rope import rope_parameters
from jaxmm.models.device_rows import DeviceRows
from jaxmm.models.encoder_jit import encoder_jit
from jaxmm.models.encoders.qwen2_vl_vision import (
    Qwen2_5_VisionTransformer,
    Qwen2VisionTransformer,
    attention_implementation,
    layout_slots,
    pack,
    patch_pixels,
)
from jaxmm.models.llama import head_dim
from jaxmm.models.qwen2 import Qwen2ForCausalLM, Qwen2Model
from jaxmm.multimodal.fast_image import PatchBytes
from jaxmm.pooling import POOLING_HIDDEN_ATTR

# items share an encoder call while its padded attention layouts (segments x longest
# segment, see `layout_slots`) stay within this many rows; a bigger item runs alone
MAX_SLOTS = 16384
# encoder calls of at least this many (bucketed) patches compile without XLA's command
# buffers: at 9216 patches (1344^2) updating the recorded graph for each call's new buffers
# took ~6 ms with the GPU idle (H100); small calls keep them for their launch savings
LARGE_BUCKET_PATCHES = 4096


class Qwen2VLTextModel(Qwen2Model):
    def __init__(self, config, *, dtype, attention_backend: str, rngs):
        super().__init__(config, dtype=dtype, attention_backend=attention_backend, rngs=rngs)
        half = head_dim(config) // 2
        section = list(rope_parameters(config).get("mrope_section") or [16, 24, 24])
        if sum(section) != half:
            raise ValueError(f"mrope_section {section} must sum to head_dim / 2 = {half}")
        # which position row (t, h, w) rotates each of the H/2 frequencies
        self.mrope_rows = tuple(i % 3 for i, n in enumerate(section) for _ in range(n))

    def rotary(self, positions):
        if positions.ndim == 1:
            positions = jnp.broadcast_to(positions, (3, positions.shape[0]))
        inv = jnp.asarray(np.array(self.inv_freq, np.float32))
        freqs = positions.astype(jnp.float32)[:, :, None] * inv  # (3, T, H/2)
        cols = np.arange(len(self.mrope_rows))
        freqs = freqs[np.array(self.mrope_rows), :, cols].T  # (T, H/2): row per frequency
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)


class Qwen2VLForConditionalGeneration(Qwen2ForCausalLM):
    model_cls = Qwen2VLTextModel
    vision_cls = Qwen2VisionTransformer
    is_multimodal = True
    mm_modalities = ("image", "video")
    uses_mrope = True
    mm_patch_bytes = True  # images through fast_image.py: uint8 patches, expanded on device
    time_scaled_video = False  # Qwen2.5-VL: temporal positions in tokens_per_second units
    hf_key_rules = (
        (r"^model\.language_model\.", "model."),
        (r"^model\.visual\.", "visual."),
    )

    def __init__(self, config, *, dtype=jnp.float32, attention_backend: str = "reference", rngs):
        text_config = copy.copy(config.text_config)
        text_config.tie_word_embeddings = bool(
            getattr(config, "tie_word_embeddings", False)
            or getattr(text_config, "tie_word_embeddings", False)
        )
        super().__init__(text_config, dtype=dtype, attention_backend=attention_backend, rngs=rngs)
        self.hf_config = config
        self.visual = self.vision_cls(config.vision_config, dtype=dtype, rngs=rngs)
        self.dtype = dtype
        # the pooling runner (`LLM(runner="pooling")`, DSE-Qwen2 style embeddings) sets this
        # on the HF config: each step's "logits" are then the final (normed) hidden states
        self.returns_hidden = bool(getattr(config, POOLING_HIDDEN_ATTR, False))

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden (S, D) -> logits (S, V) in float32, or the hidden states themselves (S, D)
        under the pooling runner."""
        if self.returns_hidden:
            return hidden.astype(jnp.float32)
        return super().compute_logits(hidden)

    # -- the multimodal contract (plain Python) ----------------------------------------------
    def mm_token_id(self, modality: str) -> int:
        c = self.hf_config
        return int(c.image_token_id if modality == "image" else c.video_token_id)

    def mm_prompt_placeholder(self, modality: str) -> list[int]:
        c = self.hf_config
        return [
            int(c.vision_start_token_id),
            self.mm_token_id(modality),
            int(c.vision_end_token_id),
        ]

    def _merge(self) -> int:
        return int(self.hf_config.vision_config.spatial_merge_size)

    def _tokens(self, grid) -> int:
        t, h, w = grid
        return t * h * w // self._merge() ** 2

    def mm_num_tokens(self, modality: str, item: dict) -> int:
        vc = self.hf_config.vision_config
        t, h, w = item["grid_thw"]
        K = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        got = tuple(np.shape(item["pixel_values"]))
        if got != (t * h * w, K):
            raise ValueError(
                f"the processor produced pixel values of shape {got}; a grid of {(t, h, w)} "
                f"takes {(t * h * w, K)} (check patch_size / temporal_patch_size in "
                "preprocessor_config.json)"
            )
        return self._tokens((t, h, w))

    def mm_check_embeds(self, modality: str, embeds: np.ndarray, meta: dict) -> dict:
        D = self.config.hidden_size
        grid = meta.get("grid_thw")
        if grid is None:
            raise ValueError(
                f"{modality} embeddings for this model need their grid: pass "
                f"{{'{modality}_embeds': (n, {D}) array, '{modality}_grid_thw': (t, h, w)}}"
            )
        want = (self._tokens(grid), D)
        if embeds.ndim != 2 or tuple(embeds.shape) != want:
            raise ValueError(
                f"{modality} embeddings with grid_thw {tuple(grid)} must have shape "
                f"(t*h*w/{self._merge() ** 2}, hidden_size) = {want}; got {tuple(embeds.shape)}"
            )
        return dict(meta)

    def mrope_positions(self, num_tokens: int, spans: list) -> tuple[np.ndarray, int]:
        """Prompt positions (3, L) and the decode delta, from the item spans.

        spans: [(start, end, modality, meta)] in prompt order; meta has grid_thw (and for
        videos second_per_grid_t).
        """
        m = self._merge()
        pos = np.empty((3, num_tokens), np.int64)
        cursor, current = 0, 0  # next prompt index, next text position
        for start, end, modality, meta in spans:
            pos[:, cursor:start] = np.arange(start - cursor) + current
            current += start - cursor
            t, h, w = meta["grid_thw"]
            lt, lh, lw = t, h // m, w // m
            tpos = np.arange(lt)
            if modality == "video" and self.time_scaled_video:
                # float32 like transformers' tensors, then truncated by .long()
                tps = np.float32(self.hf_config.vision_config.tokens_per_second)
                interval = tps * np.float32(meta.get("second_per_grid_t", 1.0))
                tpos = (tpos.astype(np.float32) * interval).astype(np.int64)
            grid = np.stack(np.meshgrid(tpos, np.arange(lh), np.arange(lw), indexing="ij"))
            pos[:, start:end] = grid.reshape(3, -1) + current
            current += max(h, w) // m
            cursor = end
        pos[:, cursor:] = np.arange(num_tokens - cursor) + current
        delta = int(pos.max()) + 1 - num_tokens if num_tokens else 0
        return pos, delta

    def pack_items(self, chunk: list[tuple]) -> dict:
        """One encoder call's host inputs (`pack`); a subclass may add tower inputs under
        "extra" (keyword arguments of its tower's call)."""
        return pack(chunk, self.hf_config.vision_config, self.vision_cls.windowed)

    def mm_encoder(self, graphdef):
        """A host function (params, modality, items) -> [features (n, D_text) per item], left
        on the device (`DeviceRows`, in the model's dtype) for the runner to splice.

        Pixel values come as float32 (n, K) or as `fast_image.PatchBytes`; those go to the
        device as the images' raw bytes with each patch's start and their byte table, and
        the jitted program cuts and expands them (`patch_pixels`) before the tower. A call
        holds one kind (and one table).
        """
        vc = self.hf_config.vision_config
        windowed = self.vision_cls.windowed
        unit = self._merge() ** 2
        tp = int(vc.temporal_patch_size)
        width = self.vision_cls.width(vc)
        impl = attention_implementation(self.dtype, width // vc.num_heads)

        def tower(params, pixels, table, sources, pos, full, window, order, unpermute, extra):
            model = nnx.merge(graphdef, params)
            if table is not None:  # raw bytes: patches cut and looked up, here
                pixels = patch_pixels(pixels, sources, table, tp)
            merged = model.visual(
                pixels.astype(model.dtype), pos, full, window, order, impl, **extra
            )
            return merged if unpermute is None else merged[unpermute]  # item order

        # large buckets compile without XLA's command buffers (`encoder_jit`); small ones,
        # whose kernels are short, keep them (launch overhead)
        run_small, run_large = jax.jit(tower), encoder_jit(tower)

        def run(params, pixels, *rest):
            big = pixels.shape[0] >= LARGE_BUCKET_PATCHES
            return (run_large if big else run_small)(params, pixels, *rest)

        def run_chunk(params, table, chunk: list[tuple], sources: list) -> list[DeviceRows]:
            b = self.pack_items(chunk)
            src = None
            if table is not None:  # each item's patch starts, shifted to its place in the call
                src = np.zeros((len(b["pixels"]), 2), np.int32)
                row, row_bytes = 0, int(np.prod(b["pixels"].shape[1:]))
                for s in sources:
                    src[row : row + len(s)] = s + np.array([row * row_bytes, 0], np.int32)
                    row += len(s)
            merged = run(
                params,
                b["pixels"],
                table,
                src,
                b["pos"],
                b["full"],
                b["window"],
                b["order"],
                b["unpermute"],
                b.get("extra", {}),
            )  # (M, D_text) in the model's dtype, items back to back, padding rows last
            counts = [len(px) // unit for px, _ in chunk]
            # views of the call's output: the runner copies them into its encoder cache
            starts = np.cumsum(counts) - counts
            return [DeviceRows(merged, int(s), int(s) + n) for s, n in zip(starts, counts)]

        def encode(params, modality: str, items: list[dict]) -> list[DeviceRows]:
            # (table, items, their patch sources) per call
            chunks: list[tuple[np.ndarray | None, list[tuple], list]] = []
            for it in items:
                pixels, grid, table, sources = it["pixel_values"], tuple(it["grid_thw"]), None, None
                if isinstance(pixels, PatchBytes):
                    if pixels.temporal_patch_size != tp:
                        raise ValueError(
                            f"patch bytes repeated over {pixels.temporal_patch_size} frames; "
                            f"this tower's temporal_patch_size is {tp}"
                        )
                    pixels, table, sources = pixels.data, pixels.table, pixels.sources
                else:
                    pixels = np.asarray(pixels, np.float32)
                if not chunks or not joins(chunks[-1], table, grid):
                    chunks.append((table, [], []))  # a new call
                chunks[-1][1].append((pixels, grid))
                chunks[-1][2].append(sources)
            # a power-of-two count of items per call (16 + 8 + 4 for 28): same-size images
            # then meet a handful of shapes, which warmup compiles (`warmup_encoders`)
            calls = []
            for table, chunk, src in chunks:
                i = 0
                while i < len(chunk):
                    k = 1 << ((len(chunk) - i).bit_length() - 1)
                    calls.append((table, chunk[i : i + k], src[i : i + k]))
                    i += k
            return [f for table, chunk, src in calls for f in run_chunk(params, table, chunk, src)]

        def joins(chunk: tuple, table: np.ndarray | None, grid: tuple) -> bool:
            """Whether an item may join this call: its kind of pixels, slots to spare."""
            chunk_table, chunk_items, _ = chunk
            grids = [g for _, g in chunk_items] + [grid]
            return (
                _same_table(table, chunk_table) and layout_slots(grids, vc, windowed) <= MAX_SLOTS
            )

        return encode


def _same_table(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two items' pixels take one encoder call: both float32, or one byte table."""
    if a is None or b is None:
        return a is b
    return a is b or np.array_equal(a, b)


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_cls = Qwen2_5_VisionTransformer
    time_scaled_video = True
