"""LLaVA-OneVision: SigLIP tower -> LLaVA's MLP projector -> anyres packing -> Qwen2.

Images are tiled by the checkpoint's `image_grid_pinpoints` on the host
(`jaxmm.multimodal.anyres`: tiling, the token counts, the layout of each image's features);
here every tile goes through the tower and the projector, and the features are packed as
transformers' `pack_image_features` packs them: the base tile's patches, then the stitched
tiles' patch map, cropped to the image (no padding), shrunk bilinearly past `anyres_max_N`
tiles' worth of patches, each row closed by `image_newline`. An image among several in one
prompt is one padded tile, closed by one newline. A video's frames are one tile each, their
patch maps halved bilinearly (`apply_pooling`), one newline after the last frame.

The bilinear resizes are two small matrices (`anyres.bilinear_matrix`, torch's
align_corners=False weights) applied along rows and columns in float32: the same sums as
`torch.nn.functional.interpolate`, as a matmul.

Text runs through the Qwen2 (or other LLaVA text) model as `language_model`; the
multimodal contract is the one `llava.py` documents, plus `mm_prompt_processor_kwargs`
(an image is tiled only when it is its prompt's only one).

Weights: checkpoints (the hub's, and what transformers' `save_pretrained` writes) name
them `language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*` (the hub's
`vision_tower.vision_model.*`), `multi_modal_projector.*`, `image_newline`: this module
tree. `hf_key_rules` also fold transformers 5's module names (`model.language_model.*`,
`model.vision_tower.*`, `model.image_newline`, `lm_head.*`) onto it. Shape letters:
B tiles, P patches per tile, D text width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.attention import AttentionMetadata
from jaxmm.models import llava
from jaxmm.models.device_rows import DeviceRows
from jaxmm.models.encoders import siglip
from jaxmm.models.encoders.siglip import SiglipVisionModel
from jaxmm.models.llava import LlavaMultiModalProjector, language_config, next_pow2
from jaxmm.multimodal import anyres

MAX_TILES_PER_CALL = 40  # tiles per tower call: an image of 6x6 tiles and its base fit


def tile_bucket(n: int) -> int:
    """Tiles per tower call: 1, 2, 4, then multiples of 4 up to 16, then of 8. Tiled images
    take 1 + rows * cols tiles (a 3x3 grid: 10 -> 12, not 16; 6x6: 37 -> 40, not 64)."""
    if n <= 4:
        return next_pow2(n)
    step = 4 if n <= 16 else 8
    return -(-n // step) * step


class LlavaOnevisionForConditionalGeneration(nnx.Module):
    is_multimodal = True
    mm_modalities = ("image", "video")
    uses_mrope = False
    hf_key_rules = (
        (r"^model\.language_model\.", "language_model.model."),
        (r"^model\.vision_tower\.", "vision_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^model\.image_newline$", "image_newline"),
        (r"^lm_head\.", "language_model.lm_head."),
        *siglip.hf_key_rules("vision_tower"),
    )

    def __init__(self, config, *, dtype=jnp.float32, attention_backend: str = "reference", rngs):
        if config.vision_feature_select_strategy != "full":
            # "default" drops a CLS token SigLIP does not have: transformers' own packing of
            # tiles and video frames then fails; LLaVA-OneVision checkpoints use "full"
            raise ValueError(
                "LLaVA-OneVision needs vision_feature_select_strategy='full'; got "
                f"{config.vision_feature_select_strategy!r}"
            )
        self.hf_config = config
        self.config = text_config = language_config(config)
        self.vision_tower = SiglipVisionModel(config.vision_config, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = LlavaMultiModalProjector(config, dtype=dtype, rngs=rngs)
        self.image_newline = nnx.Param(jnp.zeros((text_config.hidden_size,), dtype=dtype))
        self.language_model = llava.text_model_class(text_config)(
            text_config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        ignored = [r"rotary_emb\.inv_freq", *siglip.ignored_hf_keys("vision_tower")]
        if text_config.tie_word_embeddings:
            ignored.append(r"^language_model\.lm_head\.weight$")
        self.ignored_hf_keys = tuple(ignored)
        self.dtype = dtype

    # -- the text path (what the runner's step calls) ----------------------------------------
    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.language_model.embed(input_ids)

    def __call__(self, input_ids, kv_caches, md: AttentionMetadata, inputs_embeds=None):
        return self.language_model(input_ids, kv_caches, md, inputs_embeds)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        return self.language_model.compute_logits(hidden)

    def kv_cache_spec(self) -> tuple[int, int, int]:
        return self.language_model.kv_cache_spec()

    # -- features ------------------------------------------------------------------------------
    @property
    def side(self) -> int:
        """Patches per tile side."""
        vc = self.hf_config.vision_config
        return vc.image_size // vc.patch_size

    def _feature_layers(self) -> list[int]:
        layers = self.hf_config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        num_states = self.hf_config.vision_config.num_hidden_layers + 1
        return [i % num_states for i in layers]

    def tile_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values (B, 3, S, S) -> projected patch features (B, P, D)."""
        layers = self._feature_layers()
        states = self.vision_tower(pixel_values.astype(self.dtype), num_states=max(layers) + 1)
        return self.multi_modal_projector(jnp.concatenate([states[i] for i in layers], axis=-1))

    def _newline(self, rows: int) -> jax.Array:
        return jnp.broadcast_to(self.image_newline[...], (rows, 1, self.config.hidden_size))

    def pack_tiled(self, feats: jax.Array, layout: anyres.TileLayout) -> jax.Array:
        """feats (B >= tiles, P, D) of one tiled image -> its rows (num_tokens, D)."""
        s, (gh, gw), D = layout.side, layout.grid, feats.shape[-1]
        base = feats[0]  # (P, D)
        x = feats[1 : layout.num_tiles].reshape(gh, gw, s, s, D)
        x = x.transpose(0, 2, 1, 3, 4).reshape(gh * s, gw * s, D)  # the stitched patch map
        top, bottom, left, right = layout.crop
        x = x[top:bottom, left:right]
        if layout.resized:
            x = _resize(x, *layout.out)
        rows = jnp.concatenate([x, self._newline(x.shape[0]).astype(x.dtype)], axis=1)
        return jnp.concatenate([base, rows.reshape(-1, D)], axis=0)

    def pack_single(self, feats: jax.Array) -> jax.Array:
        """feats (B, P, D) of single-tile images -> (B, P + 1, D): a newline after each."""
        newline = jnp.broadcast_to(self.image_newline[...], (feats.shape[0], 1, feats.shape[-1]))
        return jnp.concatenate([feats, newline.astype(feats.dtype)], axis=1)

    def pack_video(self, feats: jax.Array, num_frames: int) -> jax.Array:
        """feats (B >= frames, P, D) of one video -> (frames * pooled patches + 1, D)."""
        s, D = self.side, feats.shape[-1]
        x = feats[:num_frames].reshape(num_frames, s, s, D)
        p = anyres.pooled_side(s)
        x = jax.vmap(lambda f: _resize(f, p, p))(x).reshape(-1, D)
        return jnp.concatenate([x, self.image_newline[...][None].astype(x.dtype)], axis=0)

    # -- the multimodal contract (plain Python; see llava.py) -------------------------------
    def mm_token_id(self, modality: str) -> int:
        c = self.hf_config
        if modality == "image":
            return int(getattr(c, "image_token_index", None) or c.image_token_id)
        return int(getattr(c, "video_token_index", None) or c.video_token_id)

    def mm_prompt_placeholder(self, modality: str) -> list[int]:
        return [self.mm_token_id(modality)]

    def mm_prompt_processor_kwargs(self, modalities: list[str]) -> dict:
        """Processor options that depend on the prompt's other items: an image is tiled only
        when it is the prompt's one image (transformers' `batch_num_images`)."""
        return {anyres.MULTI_IMAGE: True} if modalities.count("image") > 1 else {}

    def layout(self, image_size) -> anyres.TileLayout:
        c = self.hf_config
        return anyres.tile_layout(
            image_size,
            c.image_grid_pinpoints,
            c.vision_config.image_size,
            self.side,
            c.vision_aspect_ratio,
        )

    def mm_num_tokens(self, modality: str, item: dict) -> int:
        vc = self.hf_config.vision_config
        shape = tuple(np.shape(item["pixel_values"]))
        tile = (vc.num_channels, vc.image_size, vc.image_size)
        if len(shape) != 4 or shape[1:] != tile:
            raise ValueError(
                f"the {modality} processor produced pixel values of shape {shape}; this model's "
                f"tower takes (n, *{tile}) (check the size in the checkpoint's processor config)"
            )
        if modality == "video":
            return anyres.video_tokens(shape[0], self.side)
        if not item.get("tiled", False):
            if shape[0] != 1:
                raise ValueError(f"an untiled image is one tile; got {shape[0]}")
            return anyres.single_tile_tokens(self.side)
        layout = self.layout(item["image_size"])
        if shape[0] != layout.num_tiles:
            raise ValueError(
                f"an image of {tuple(item['image_size'])} takes {layout.num_tiles} tiles with "
                f"this checkpoint's image_grid_pinpoints; the processor made {shape[0]}"
            )
        return layout.num_tokens

    def mm_check_embeds(self, modality: str, embeds: np.ndarray, meta: dict) -> dict:
        # the token count depends on the image's size, which embeddings do not carry
        D = self.config.hidden_size
        if embeds.ndim != 2 or embeds.shape[1] != D or len(embeds) == 0:
            raise ValueError(
                f"{modality} embeddings must have shape (num_tokens, hidden_size={D}) for this "
                f"model; got {tuple(embeds.shape)}"
            )
        return {}

    def mm_encoder(self, graphdef):
        """A host function (params, modality, items) -> [features (n, D) per item], left on
        the device (`DeviceRows`, in the model's dtype) for the runner to splice.

        Images share tower calls of up to `MAX_TILES_PER_CALL` tiles (an item is never
        split; a larger one runs alone), padded to a tile bucket (`tile_bucket`): one tower
        program per bucket. Each item is then packed from its tiles' place in the call (a
        traced offset) by a small program keyed by the bucket and the item's layout; a
        video (frames as tiles) runs alone. Packed rows are padded to a power of two, so
        the runner's copies into its cache meet few shapes."""

        @jax.jit
        def tower(params, pixels, table):
            if table is not None:  # uint8 tiles: each byte's value per channel, looked up here
                idx = pixels.astype(jnp.int32)
                pixels = table[jnp.arange(table.shape[0])[None, :, None, None], idx]
            return nnx.merge(graphdef, params).tile_features(pixels)

        @functools.partial(jax.jit, static_argnums=(3, 4))
        def pack(params, feats, start, kind: str, how):
            model = nnx.merge(graphdef, params)
            if kind == "tiled":
                tiles = jax.lax.dynamic_slice_in_dim(feats, start, how.num_tiles)
                out = model.pack_tiled(tiles, how)
            elif kind == "video":
                out = model.pack_video(feats, how)
            else:
                tile = jax.lax.dynamic_slice_in_dim(feats, start, 1)
                out = model.pack_single(tile)[0]
            pad = next_pow2(out.shape[0]) - out.shape[0]
            return jnp.pad(out, ((0, pad), (0, 0)))

        def features(params, pixels: list[np.ndarray], table: np.ndarray | None):
            n = sum(len(p) for p in pixels)
            padded = np.zeros((tile_bucket(n), *pixels[0].shape[1:]), pixels[0].dtype)
            padded[:n] = np.concatenate(pixels)
            return tower(params, padded, table)

        def host(it: dict) -> tuple[np.ndarray, np.ndarray | None]:
            """An item's pixels as they travel: uint8 + byte table, or float32."""
            table = it.get("byte_table")
            if table is not None:
                return np.asarray(it["pixel_values"], np.uint8), np.asarray(table, np.float32)
            return np.asarray(it["pixel_values"], np.float32), None

        def encode(params, modality: str, items: list[dict]) -> list[DeviceRows]:
            if modality == "video":
                out = []
                for it in items:
                    pixels, table = host(it)
                    feats = features(params, [pixels], table)
                    packed = pack(params, feats, 0, "video", len(pixels))
                    out.append(DeviceRows(packed, 0, anyres.video_tokens(len(pixels), self.side)))
                return out
            jobs = []  # (pixels, table, kind, layout, rows) per image
            for it in items:
                pixels, table = host(it)
                if it.get("tiled", False):
                    layout = self.layout(it["image_size"])
                    jobs.append((pixels, table, "tiled", layout, layout.num_tokens))
                else:
                    rows = anyres.single_tile_tokens(self.side)
                    jobs.append((pixels[:1], table, "", None, rows))
            # calls of whole items, one kind of pixels (and one table) each
            calls: list[list[int]] = []
            tiles = MAX_TILES_PER_CALL  # in the last call
            for i, (pixels, table, *_) in enumerate(jobs):
                last = jobs[calls[-1][0]][1] if calls else None
                if tiles + len(pixels) > MAX_TILES_PER_CALL or not same_table(table, last):
                    calls.append([])
                    tiles = 0
                calls[-1].append(i)
                tiles += len(pixels)
            out: list[DeviceRows | None] = [None] * len(jobs)
            for call in calls:
                feats = features(params, [jobs[i][0] for i in call], jobs[call[0]][1])
                start = 0
                for i in call:
                    pixels, _, kind, layout, rows = jobs[i]
                    packed = pack(params, feats, np.int32(start), kind, layout)
                    out[i] = DeviceRows(packed, 0, rows)
                    start += len(pixels)
            return out  # type: ignore[return-value]

        return encode


def same_table(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two items' pixels can share a tower call: both float32, or one byte table."""
    if a is None or b is None:
        return a is b
    return a is b or np.array_equal(a, b)


def _resize(x: jax.Array, rows: int, cols: int) -> jax.Array:
    """x (h, w, D) -> (rows, cols, D): torch's bilinear interpolate (align_corners=False,
    no antialias), in float32."""
    h, w, _ = x.shape
    mh = jnp.asarray(anyres.bilinear_matrix(h, rows))
    mw = jnp.asarray(anyres.bilinear_matrix(w, cols))
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("rh,hwD->rwD", mh, x.astype(jnp.float32), precision=hi)
    y = jnp.einsum("cw,rwD->rcD", mw, y, precision=hi)
    return y.astype(x.dtype)
