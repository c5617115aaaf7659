"""Phi-4-multimodal's image tower (`embed_tokens_extend.image_embed`), HF names.

A SigLIP encoder over crops of S x S pixels (`img_processor`), with what the HD crops need:
- a patch mask per crop (0 over patches of white padding): masked patches are left out of
  attention as keys, and the position embedding of a crop with fewer patch rows or
  columns is spread over the whole table (each patch's fractional coordinate bucketed, as
  transformers' NaFlex-style `position_ids`; computed on the host, `position_ids`);
- the hidden state of layer `feature_layer` (-2: the last layer's input), pooled 2 x 2
  (reflection-padded to an even grid first) into 16 x 16 features per crop;
- the image's tokens, in transformers' order: the sub-crops' features as one grid, cut to the
  mask's useful rows and columns, each row closed by `sub_img_feature_extensor`; then
  `global_img_feature_extensor`; then the global view's 16 x 16, each row closed likewise;
- `img_projection_up` -> GELU -> `img_projection_down`, row by row: applied here to every
  pooled feature and to the two extensors, and the token rows gathered after
  (`token_index`, host-side: the same rows, one gather on the device).

Attention is bidirectional. transformers' eager path computes that; its SDPA path drops
the all-ones mask of an unpadded crop and then runs the tower causally (`is_causal` of its
attention module), which the released weights were not trained for, so the tests compare
with the eager path. Shape letters: B crops, P patches per crop, D width, N heads, H head
dim, Q pooled features per crop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.linear import Embed, Linear
from jaxmm.models.encoders.clip import LayerNorm
from jaxmm.models.encoders.siglip import PatchConv, SiglipAttention, SiglipEncoderLayer


def position_ids(mask: np.ndarray, per_side: int) -> np.ndarray:
    """mask (B, M, M) of patches -> (B, M * M) position ids into a per_side^2 table, as
    transformers' vision embeddings bucket them (float32 coordinates; 0 where masked)."""
    mask = np.asarray(mask).astype(bool)
    B, Mh, Mw = mask.shape
    # torch.arange(1/n, 1.0, 1/n) in float32: its length and values computed in float64
    step = 1.0 / per_side
    count = int(np.ceil((1.0 - step) / step))
    bounds = (step + np.arange(count, dtype=np.float64) * step).astype(np.float32)
    rows = mask[:, :, 0].sum(1).astype(np.float32)  # (B,)
    cols = mask[:, 0, :].sum(1).astype(np.float32)
    limit = np.float32(1.0 - 1e-6)
    out = np.zeros((B, Mh * Mw), np.int32)
    with np.errstate(divide="ignore"):
        step_h, step_w = np.float32(1.0) / rows, np.float32(1.0) / cols
    for b in range(B):
        fh = np.minimum(np.arange(Mh, dtype=np.float32) * step_h[b], limit)
        fw = np.minimum(np.arange(Mw, dtype=np.float32) * step_w[b], limit)
        bh = np.searchsorted(bounds, fh, side="right")
        bw = np.searchsorted(bounds, fw, side="right")
        ids = (bh[:, None] * per_side + bw[None, :]).reshape(-1)
        out[b] = np.where(mask[b].reshape(-1), ids, 0)
    return out


class Phi4MultimodalVisionEmbeddings(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D, C, p = config.hidden_size, config.num_channels, config.patch_size
        self.patch_size = p
        self.patch_embedding = PatchConv(D, C, p, dtype)
        self.position_embedding = Embed((config.image_size // p) ** 2, D, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, pos_ids: jax.Array) -> jax.Array:
        """pixel_values (B, C, S, S), pos_ids (B, P) -> (B, P, D)."""
        B, Cin, Hpx, Wpx = pixel_values.shape
        p = self.patch_size
        x = pixel_values.reshape(B, Cin, Hpx // p, p, Wpx // p, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(B, (Hpx // p) * (Wpx // p), Cin * p * p)
        w = self.patch_embedding.weight[...]
        patches = jnp.einsum(
            "BPK,DK->BPD",
            x.astype(w.dtype),
            w.reshape(w.shape[0], -1),
            precision=jax.lax.Precision.HIGHEST,
        )
        patches = patches + self.patch_embedding.bias[...]
        return patches + self.position_embedding.embedding[...][pos_ids]


class Phi4MultimodalVisionAttention(SiglipAttention):
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:  # x (B, P, D), bias (B, P)
        B, P, _ = x.shape
        q = self.q_proj(x).reshape(B, P, self.N, self.H)
        k = self.k_proj(x).reshape(B, P, self.N, self.H)
        v = self.v_proj(x).reshape(B, P, self.N, self.H)
        scores = jnp.einsum("BQNH,BKNH->BNQK", q, k, precision=jax.lax.Precision.HIGHEST)
        scores = scores.astype(jnp.float32) * self.H**-0.5 + bias[:, None, None, :]
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("BNQK,BKNH->BQNH", probs, v, precision=jax.lax.Precision.HIGHEST)
        return self.out_proj(out.reshape(B, P, self.N * self.H))


class Phi4MultimodalVisionEncoderLayer(SiglipEncoderLayer):
    def __init__(self, config, *, dtype, rngs):
        super().__init__(config, dtype=dtype, rngs=rngs)
        self.self_attn = Phi4MultimodalVisionAttention(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class Phi4MultimodalVisionEncoder(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.layers = nnx.List(
            [
                Phi4MultimodalVisionEncoderLayer(config, dtype=dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )


class Phi4MultimodalVisionModel(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.embeddings = Phi4MultimodalVisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = Phi4MultimodalVisionEncoder(config, dtype=dtype, rngs=rngs)
        # post_layernorm feeds only the pooling head; no feature layer reads it
        self.post_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype)

    def hidden_state(self, pixel_values, pos_ids, mask, index: int) -> jax.Array:
        """HF's `hidden_states[index]` (0: embeddings, i: layer i's output) -> (B, P, D)."""
        L = len(self.encoder.layers)
        index = index % (L + 1)
        bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)  # (B, P): masked keys
        x = self.embeddings(pixel_values, pos_ids)
        for layer in list(self.encoder.layers)[:index]:
            x = layer(x, bias)
        return x


class Phi4MultimodalImageEmbedding(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        vc = config.vision_config
        Dv, Dt = vc.hidden_size, config.hidden_size
        self.layer_idx = vc.feature_layer
        self.per_side = vc.image_size // vc.patch_size
        self.img_processor = Phi4MultimodalVisionModel(vc, dtype=dtype, rngs=rngs)
        self.img_projection_up = Linear(Dv, Dt, bias=True, dtype=dtype, rngs=rngs)
        self.img_projection_down = Linear(Dt, Dt, bias=True, dtype=dtype, rngs=rngs)
        self.global_img_feature_extensor = nnx.Param(jnp.zeros((1, 1, Dv), dtype=dtype))
        self.sub_img_feature_extensor = nnx.Param(jnp.zeros((1, 1, 1, Dv), dtype=dtype))

    def project(self, x: jax.Array) -> jax.Array:
        return self.img_projection_down(jax.nn.gelu(self.img_projection_up(x), approximate=False))

    def __call__(self, pixel_values, pos_ids, mask, index) -> jax.Array:
        """Crops (B, 3, S, S) of one image (any padding crops last), their pos_ids and masks
        (B, P), token_index (n,) -> the image's token rows (n, D_text)."""
        x = self.img_processor.hidden_state(pixel_values, pos_ids, mask, self.layer_idx)
        B, P, D = x.shape
        M = self.per_side
        x = x.reshape(B, M, M, D)
        if M % 2:  # ReflectionPad2d((0, 1, 0, 1))
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="reflect")
            M += 1
        x = x.reshape(B, M // 2, 2, M // 2, 2, D).mean(axis=(2, 4)).reshape(-1, D)  # (B * Q, D)
        ext = jnp.concatenate(
            [
                self.sub_img_feature_extensor[...].reshape(1, D),
                self.global_img_feature_extensor[...].reshape(1, D),
            ]
        )
        table = self.project(jnp.concatenate([x, ext]).astype(x.dtype))  # row-wise projection
        return table[index]


def token_index(mask: np.ndarray, image_size: tuple, crop: int, num_crops: int) -> np.ndarray:
    """Rows of the image's tokens in the table `Phi4MultimodalImageEmbedding` builds
    (pooled features of its `num_crops` crop slots, then the sub and global extensors), in
    transformers' order. mask: (1 + crops, M, M) of the image, image_size: the padded size."""
    mask = np.asarray(mask).astype(bool)
    M = mask.shape[-1]
    G = (M + 1) // 2  # pooled features per side
    Q = G * G
    sub_ext, glob_ext = num_crops * Q, num_crops * Q + 1
    h_ratio, w_ratio = image_size[0] // crop, image_size[1] // crop
    # sub-crops as one grid of (h_ratio * G, w_ratio * G) features
    crop_of = np.arange(h_ratio * w_ratio).reshape(h_ratio, w_ratio)
    r = np.arange(h_ratio * G)
    c = np.arange(w_ratio * G)
    cell = crop_of[r[:, None] // G, c[None, :] // G]  # (rows, cols) crop of each feature
    rows = (1 + cell) * Q + (r[:, None] % G) * G + (c[None, :] % G)
    pooled = mask[1 : 1 + h_ratio * w_ratio, 0::2, 0::2]  # (crops, G, G)
    grid = pooled.reshape(h_ratio, w_ratio, G, G).transpose(0, 2, 1, 3)
    grid = grid.reshape(h_ratio * G, w_ratio * G)
    useful_h, useful_w = int(grid[:, 0].sum()), int(grid[0, :].sum())
    rows = rows[:useful_h, :useful_w]
    sub = np.concatenate([rows, np.full((useful_h, 1), sub_ext)], axis=1).reshape(-1)
    glob = np.arange(Q).reshape(G, G)
    glob = np.concatenate([glob, np.full((G, 1), sub_ext)], axis=1).reshape(-1)
    return np.concatenate([sub, [glob_ext], glob]).astype(np.int32)
