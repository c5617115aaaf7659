"""MiniCPM-V 4.6 (`MiniCPMV4_6ForConditionalGeneration`): a SigLIP-style tower over sliced
images, a window merger inside it and a 2x2 merger after it, then Qwen3.5's hybrid decoder.

1. Slicing is the HF image processor's (`MiniCPMV4_6ImageProcessorPil`): an image becomes
   a source view resized to about `scale_resolution`^2 and, when larger than that, a grid
   of slices; all of them NaViT-packed into one `pixel_values` (3, p, patches * p) with each
   sub-image's patch grid in `target_sizes` and the slice grid in `grids` (the front end
   keeps both, `multimodal/processor.py`).
2. The tower (`encoders/minicpmv_vision.py`) runs each sub-image on its own (attention
   inside it only); sub-images of any size share a call, padded to a patch-count bucket,
   their patches in block-major order so that no program depends on the grid. Each gives
   h * w / 16 rows ("16x") or h * w / 4 ("4x", no window merger).
3. Placeholders: the prompt holds one image token per image; its span is the processor's
   text, `<image>` + the source's tokens + `</image>`, then per slice row (rows joined by
   "\\n") `<slice>` + tokens + `</slice>` per slice (`mm_span_ids`). The span's encoder rows
   are the tower's at image tokens and the text's own embeddings elsewhere, so the runner
   splices the whole span. Before each image the processor writes `<image_id>i</image_id>`
   (i counts the prompt's images): that depends on the prompt, not the image, so it goes
   into the prompt's ids before each placeholder (`mm_mark_items`), text and token-id
   prompts alike; HF's default `use_image_id=True` is assumed (a processor saved with
   False is not followed).
4. Text: Qwen3.5 (`qwen3_5.py`, the checkpoint's `text_config`, plain 1-D positions:
   transformers gives the text model no M-RoPE positions here), with its state slots.

Weights: transformers saves `model.vision_tower.*`, `model.merger.*`,
`model.language_model.*`, `lm_head.*`; `hf_key_rules` fold them onto this tree.
Precomputed image embeddings come with the image's size (vLLM's `image_sizes`, (width,
height)), which sets the span; their rows are spread over it like the tower's. Videos: not yet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.attention import AttentionMetadata
from jaxmm.models.device_rows import DeviceRows
from jaxmm.models.encoders.minicpmv_vision import (
    MiniCPMVMerger,
    MiniCPMVVisionModel,
    block_order,
    position_ids,
)
from jaxmm.models.llava import language_config, next_pow2
from jaxmm.models.qwen3_5 import Qwen3_5ForCausalLM

# the tokens of the processor's image text (MiniCPM-V's tokenizer names them so)
IMAGE_START, IMAGE_END = "<image>", "</image>"
SLICE_START, SLICE_END = "<slice>", "</slice>"
ID_START, ID_END = "<image_id>", "</image_id>"


def _one_token(encode_text, text: str) -> int:
    ids = encode_text(text)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer must have {text!r} as one token; got {ids}")
    return ids[0]


class MiniCPMV4_6ForConditionalGeneration(nnx.Module):
    is_multimodal = True
    mm_modalities = ("image",)
    uses_mrope = False
    hf_key_rules = (
        (r"^model\.language_model\.", "language_model.model."),
        (r"^model\.vision_tower\.", "vision_tower."),
        (r"^model\.merger\.", "merger."),
        (r"^lm_head\.", "language_model.lm_head."),
    )

    def __init__(self, config, *, dtype=jnp.float32, attention_backend: str = "reference", rngs):
        self.hf_config = config
        self.config = text_config = language_config(config)
        if getattr(text_config, "model_type", None) != "qwen3_5_text":
            raise ValueError(
                "MiniCPM-V 4.6 is supported with its Qwen3.5 text model (text_config "
                f"model_type 'qwen3_5_text'); got {getattr(text_config, 'model_type', None)!r}"
            )
        self.language_model = Qwen3_5ForCausalLM(
            text_config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        self.vision_tower = MiniCPMVVisionModel(config.vision_config, dtype=dtype, rngs=rngs)
        self.merger = MiniCPMVMerger(config, text_config.hidden_size, dtype=dtype, rngs=rngs)
        self.use_vit_merger = config.downsample_mode != "4x"
        # patches per row: the window merger's 2x2 ("16x" only), then the merger's rounds
        self.divisor = (4 if self.use_vit_merger else 1) * 4 ** int(config.merger_times)
        ignored = [r"^mtp\.", r"rotary_emb\.inv_freq"]
        if text_config.tie_word_embeddings:
            ignored.append(r"^language_model\.lm_head\.weight$")
        self.ignored_hf_keys = tuple(ignored)
        self.dtype = dtype

    # -- the text path (what the runner's step calls) ----------------------------------------
    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.language_model.embed(input_ids)

    def __call__(
        self, input_ids, kv_caches, md: AttentionMetadata, inputs_embeds=None, seq_inputs=None
    ):
        return self.language_model(input_ids, kv_caches, md, inputs_embeds, seq_inputs)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        return self.language_model.compute_logits(hidden)

    def kv_cache_spec(self) -> tuple[int, int, int]:
        return self.language_model.kv_cache_spec()

    def state_cache_spec(self, dtype) -> list[tuple[tuple[int, ...], jnp.dtype]]:
        return self.language_model.state_cache_spec(dtype)

    # -- features ------------------------------------------------------------------------------
    @property
    def merge_levels(self) -> int:
        """2x2 merges from patches to rows: the window merger's ("16x") and the merger's."""
        return int(self.use_vit_merger) + int(self.hf_config.merger_times)

    def sub_image_inputs(self, patches: np.ndarray, h: int, w: int) -> tuple[np.ndarray, ...]:
        """One sub-image's row-major patches (h * w, K) -> the tower's inputs: the patches
        and their position-table rows (h * w,), both in block-major order."""
        order = block_order(h, w, self.merge_levels)
        side = self.vision_tower.embeddings.side
        return patches[order], position_ids(h, w, side)[order]

    def sub_image_features(self, patches: jax.Array, pos: jax.Array, lens: jax.Array):
        """patches (B, C, K) block-major, pos (B, C), lens (B,) -> rows (B, C / divisor, E)."""
        x = self.vision_tower(patches.astype(self.dtype), pos, lens, self.use_vit_merger)
        return self.merger(x)

    # -- the multimodal contract (plain Python; see llava.py) -------------------------------
    def mm_token_id(self, modality: str) -> int:
        return int(self.hf_config.image_token_id)

    def mm_prompt_placeholder(self, modality: str) -> list[int]:
        return [self.mm_token_id(modality)]

    def mm_mark_items(self, ids: list[int], encode_text) -> list[int]:
        """`<image_id>i</image_id>` before the prompt's i-th image placeholder, as the HF
        processor writes it (`_prepend_local_ids`); a placeholder marked already is kept."""
        token = self.mm_token_id("image")
        start, end = _one_token(encode_text, ID_START), _one_token(encode_text, ID_END)
        out: list[int] = []
        index = 0
        for t in ids:
            if t == token and (not out or out[-1] != token):  # a placeholder (or run) starts
                if not out or out[-1] != end:
                    out += [start, *encode_text(str(index)), end]
                index += 1
            out.append(t)
        return out

    def _sizes(self, item: dict) -> np.ndarray:
        sizes = np.asarray(item.get("target_sizes"), np.int64).reshape(-1, 2)
        if item.get("target_sizes") is None or len(sizes) == 0:
            raise ValueError(
                "MiniCPM-V images need the processor's target_sizes (a MiniCPM-V image processor)"
            )
        step = int(round(self.divisor**0.5))  # each 2x2 merge halves both sides
        if (sizes % step).any():
            raise ValueError(f"sub-image patch grids {sizes.tolist()} must be multiples of {step}")
        return sizes

    def _tokens(self, sizes: np.ndarray) -> list[int]:
        return [int(h * w) // self.divisor for h, w in sizes]

    def mm_span_ids(self, modality: str, item: dict, encode_text) -> list[int]:
        """The image's text: source view, then its slices row by row (see the module doc)."""

        token = self.mm_token_id("image")
        counts = self._tokens(self._sizes(item))
        rows, cols = (int(g) for g in np.asarray(item.get("grids", (0, 0))).reshape(-1)[:2])

        def one(text: str) -> int:
            return _one_token(encode_text, text)

        span = [one(IMAGE_START), *[token] * counts[0], one(IMAGE_END)]
        if rows > 0 and cols > 0:
            if len(counts) != 1 + rows * cols:
                raise ValueError(f"{len(counts) - 1} slices for a {rows}x{cols} grid of slices")
            for r in range(rows):
                if r:
                    span += encode_text("\n")
                for n in counts[1 + r * cols : 1 + (r + 1) * cols]:
                    span += [one(SLICE_START), *[token] * n, one(SLICE_END)]
        elif len(counts) != 1:
            raise ValueError(f"{len(counts)} sub-images for an image without slices")
        return span

    def mm_num_tokens(self, modality: str, item: dict) -> int:
        sizes = self._sizes(item)
        vc = self.hf_config.vision_config
        p = int(vc.patch_size)
        want = (int(vc.num_channels), p, int((sizes[:, 0] * sizes[:, 1]).sum()) * p)
        got = tuple(np.shape(item["pixel_values"]))
        if got != want:
            raise ValueError(
                f"the image processor produced pixel values of shape {got}; for sub-images of "
                f"{sizes.tolist()} patches this tower takes {want} (NaViT-packed)"
            )
        # an item prepared outside the front end has no span: the tower's rows alone
        return len(item["span_ids"]) if "span_ids" in item else sum(self._tokens(sizes))

    def mm_check_embeds(self, modality: str, embeds: np.ndarray, meta: dict) -> dict:
        """Precomputed rows (the merger's output, source view then slices) need the image's
        size, which sets its slice layout: the front end lays out a blank image of that size
        and checks the row count (`MultimodalFrontend._embeds_span`)."""
        E = self.config.hidden_size
        if meta.get("image_size") is None:
            raise ValueError(
                "MiniCPM-V image embeddings need the image's size, which sets its slices: pass "
                f"{{'image_embeds': (n, {E}) array, 'image_sizes': (width, height)}}"
            )
        if embeds.ndim != 2 or embeds.shape[1] != E:
            raise ValueError(
                f"image embeddings must have shape (num_tokens, hidden_size={E}) for this "
                f"model: every sub-image's rows, one after another; got {tuple(embeds.shape)}"
            )
        return dict(meta)

    def patch_bucket(self, n: int) -> int:
        """Patches per sub-image in a tower call: powers of two and 1.5x them, multiples of
        the rows' patch count (16, 32, 48, 64, 96, ... for "16x")."""
        p = max(next_pow2(n), self.divisor)
        return 3 * p // 4 if p >= 4 * self.divisor and 3 * p // 4 >= n else p

    def mm_encoder(self, graphdef):
        """A host function (params, modality, items) -> [span rows per item] on the device.

        Every item's sub-images go to the tower by patch-count bucket (`patch_bucket`), any
        sizes together, a call padded to a power of two of sub-images: one program per
        (count, bucket). An item's span rows then come from one small program: the tower's
        rows at its image tokens, the text's embeddings elsewhere, padded to a power of two
        of rows. Precomputed rows (`image_embeds`) skip the tower."""
        vc = self.hf_config.vision_config
        p, C = int(vc.patch_size), int(vc.num_channels)
        token = self.mm_token_id("image")
        div = self.divisor

        @jax.jit
        def tower(params, patches, pos, lens):
            return nnx.merge(graphdef, params).sub_image_features(patches, pos, lens)

        @jax.jit
        def spread(params, groups, src, text_ids, is_image):
            rows = jnp.concatenate([g.reshape(-1, g.shape[-1]) for g in groups])  # (M, E)
            text = nnx.merge(graphdef, params).embed(text_ids).astype(rows.dtype)  # (L, E)
            return jnp.where(is_image[:, None], rows[src], text)

        def encode(params, modality: str, items: list[dict]) -> list[DeviceRows]:
            # (item, sub-image) -> (patches, pos); sub-images grouped by bucket across items
            groups: dict[int, list[tuple[int, int]]] = {}
            inputs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
            for i, it in enumerate(items):
                if "image_embeds" in it:  # precomputed rows: spread over the span only
                    continue
                px = np.asarray(it["pixel_values"], np.float32)  # (C, p, patches * p)
                flat = px.reshape(C, p, -1, p).transpose(2, 0, 1, 3).reshape(-1, C * p * p)
                start = 0
                for j, (h, w) in enumerate(self._sizes(it)):
                    h, w = int(h), int(w)
                    inputs[(i, j)] = self.sub_image_inputs(flat[start : start + h * w], h, w)
                    groups.setdefault(self.patch_bucket(h * w), []).append((i, j))
                    start += h * w
            outs, where = [], {}  # where: (item, sub-image) -> its first row in the concat
            base = 0
            for bucket, members in groups.items():
                B = next_pow2(len(members))
                patches = np.zeros((B, bucket, C * p * p), np.float32)
                pos = np.zeros((B, bucket), np.int32)
                lens = np.full((B,), bucket, np.int32)  # padding sub-images: no masked rows
                for k, key in enumerate(members):
                    n = len(inputs[key][1])
                    patches[k, :n], pos[k, :n] = inputs[key]
                    lens[k] = n
                    where[key] = base + k * (bucket // div)
                outs.append(tower(params, patches, pos, lens))  # (B, bucket / div, E)
                base += B * (bucket // div)
            for i, it in enumerate(items):
                if "image_embeds" in it:
                    rows = np.asarray(it["image_embeds"])
                    padded = np.zeros((1, next_pow2(len(rows)), rows.shape[1]), self.dtype)
                    padded[0, : len(rows)] = rows
                    where[(i, 0)] = base
                    base += padded.shape[1]
                    outs.append(jnp.asarray(padded))
            result = []
            for i, it in enumerate(items):
                # an item prepared outside the front end has no span: the tower's rows alone
                span = it.get("span_ids") or [token] * sum(self._tokens(self._sizes(it)))
                L = max(next_pow2(len(span)), 16)
                ids = np.zeros(L, np.int32)
                ids[: len(span)] = span
                is_image = ids == token
                is_image[len(span) :] = False
                src = np.zeros(L, np.int32)
                if "image_embeds" in it:
                    src[is_image] = where[(i, 0)] + np.arange(int(is_image.sum()))
                else:
                    counts = self._tokens(self._sizes(it))
                    src[is_image] = np.concatenate(
                        [where[(i, j)] + np.arange(n) for j, n in enumerate(counts)]
                    )
                arr = spread(params, tuple(outs), src, np.where(is_image, 0, ids), is_image)
                result.append(DeviceRows(arr, 0, len(span)))
            return result

        return encode
