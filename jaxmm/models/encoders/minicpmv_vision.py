"""MiniCPM-V 4.6's vision tower and merger, HF names (`MiniCPMV4_6VisionModel`,
`MiniCPMV4_6Merger`).

The tower is SigLIP's (`siglip.py`: the same encoder layers, attention and MLP) over one
sub-image at a time, at its own size: the image processor cuts an image into a source
view and slices, each of (h, w) patches (`target_sizes`), and each attends only to
itself. What differs from SigLIP:

1. Positions: a patch at row i of h gets the learned row of the nearest bucket of the
   side x side table (`bucket(i / h)`, torch's `bucketize(right=True)` over the
   boundaries 1/side, 2/side, ...), so any (h, w) maps onto the table (`position_ids`).
2. The window merger (`vit_merger`, after layer `insert_layer_id`, "16x" mode only):
   attention inside each 2x2 window of patches, then the window's four rows, concatenated
   and LayerNorm-ed, through an MLP to one row, plus their mean: (h, w) -> (h/2, w/2),
   windows in row-major order. The layers after it run on the smaller grid.
3. The merger (`MiniCPMV4_6Merger`): after `post_layernorm`, 2x2 blocks of rows are
   concatenated and projected (`merger_times` rounds, the last into the text width).

So a sub-image of (h, w) patches gives h * w / 16 rows ("16x") or h * w / 4 ("4x").
Shape letters: B sub-images of one size, C patches per sub-image, D tower width,
E text width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.linear import Embed, Linear
from jaxmm.layers.mlp import activation
from jaxmm.models.encoders.clip import LayerNorm
from jaxmm.models.encoders.siglip import PatchConv, SiglipAttention, SiglipEncoder


def position_ids(h: int, w: int, side: int) -> np.ndarray:
    """(h * w,) rows of the side x side position table for an (h, w) patch grid, as
    transformers' `get_vision_nearest_position_ids` picks them (float32, as torch's)."""
    step = 1.0 / side
    count = int(np.ceil((1.0 - step) / step))  # torch.arange(step, 1.0, step)'s length
    bounds = ((np.arange(count, dtype=np.float64) + 1) * step).astype(np.float32)

    def bucket(n: int) -> np.ndarray:
        coords = np.arange(n, dtype=np.float32) / np.float32(n)
        return np.searchsorted(bounds, coords, side="right")

    return (bucket(h)[:, None] * side + bucket(w)[None, :]).reshape(-1)


def blocks_2x2(x: jax.Array, h: int, w: int) -> jax.Array:
    """x (B, h * w, D), row-major -> (B, h/2 * w/2, 4, D): each 2x2 block's rows, blocks in
    row-major order (the window merger's `window_index` and the merger's view)."""
    B, _, D = x.shape
    x = x.reshape(B, h // 2, 2, w // 2, 2, D).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (h // 2) * (w // 2), 4, D)


class MiniCPMVVisionEmbeddings(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D, C, p = config.hidden_size, config.num_channels, config.patch_size
        self.side = config.image_size // p
        self.patch_embedding = PatchConv(D, C, p, dtype)
        self.position_embedding = Embed(self.side**2, D, dtype=dtype, rngs=rngs)

    def __call__(self, patches: jax.Array, h: int, w: int) -> jax.Array:
        """patches (B, C, 3 * p * p) of (h, w) grids, row-major -> (B, C, D)."""
        wt = self.patch_embedding.weight[...]
        x = jnp.einsum("BCK,DK->BCD", patches.astype(wt.dtype), wt.reshape(wt.shape[0], -1))
        x = x + self.patch_embedding.bias[...]
        pos = jnp.asarray(position_ids(h, w, self.side))
        return x + self.position_embedding.embedding[...][pos][None]


class MiniCPMVWindowMerger(nnx.Module):
    """`MiniCPMV4_6ViTWindowAttentionMerger`: 2x2 window attention, then each window -> 1."""

    def __init__(self, config, *, dtype, rngs):
        D, eps = config.hidden_size, config.layer_norm_eps
        kh, kw = config.window_kernel_size
        if (kh, kw) != (2, 2):
            raise ValueError(f"window_kernel_size {(kh, kw)} is not supported; jaxmm takes (2, 2)")
        self.self_attn = SiglipAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(D, eps, dtype=dtype)
        self.pre_norm = LayerNorm(4 * D, eps, dtype=dtype)
        self.linear_1 = Linear(
            4 * D, 4 * config.intermediate_size, bias=True, dtype=dtype, rngs=rngs
        )
        self.linear_2 = Linear(4 * config.intermediate_size, D, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, h: int, w: int) -> jax.Array:
        """x (B, h * w, D) -> (B, h/2 * w/2, D)."""
        B, _, D = x.shape
        windows = blocks_2x2(x, h, w)  # (B, n, 4, D): the residual, in window order
        n = windows.shape[1]
        attn = self.self_attn(self.layer_norm1(windows.reshape(B * n, 4, D)))
        windows = windows + attn.reshape(B, n, 4, D)
        out = self.linear_1(self.pre_norm(windows.reshape(B, n, 4 * D)))
        out = self.linear_2(activation("gelu_pytorch_tanh")(out))
        return out + windows.mean(axis=2)


class MiniCPMVVisionModel(nnx.Module):
    def __init__(self, config, *, dtype=jnp.float32, rngs):
        self.insert_layer_id = int(config.insert_layer_id)
        self.embeddings = MiniCPMVVisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = SiglipEncoder(config, dtype=dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype)
        self.vit_merger = MiniCPMVWindowMerger(config, dtype=dtype, rngs=rngs)

    def __call__(self, patches: jax.Array, h: int, w: int, use_vit_merger: bool) -> jax.Array:
        """patches (B, h * w, 3 * p * p) -> post-normed rows (B, C', D), C' = h * w / 4 with
        the window merger, else h * w; still row-major over the (smaller) grid."""
        x = self.embeddings(patches, h, w)
        merge_at = self.insert_layer_id if use_vit_merger else -1
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x)  # SigLIP's attention: the whole sub-image, both ways
            if i == merge_at:
                x = self.vit_merger(x, h, w)
                h, w = h // 2, w // 2
        return self.post_layernorm(x)


class MiniCPMVDownsampleMLP(nnx.Module):
    def __init__(self, D: int, out: int, *, dtype, rngs):
        self.pre_norm = LayerNorm(4 * D, 1e-6, dtype=dtype)
        self.linear_1 = Linear(4 * D, 4 * D, bias=True, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(4 * D, out, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(activation("gelu")(self.linear_1(self.pre_norm(x))))


class MiniCPMVMerger(nnx.Module):
    """`MiniCPMV4_6Merger`: `merger_times` rounds of 2x2 blocks -> one row each."""

    def __init__(self, config, text_hidden_size: int, *, dtype, rngs):
        if tuple(config.merge_kernel_size) != (2, 2):
            raise ValueError(
                f"merge_kernel_size {tuple(config.merge_kernel_size)} is not supported; "
                "jaxmm takes (2, 2)"
            )
        D, times = config.vision_config.hidden_size, int(config.merger_times)
        outs = [D] * (times - 1) + [text_hidden_size]
        self.mlp = nnx.List([MiniCPMVDownsampleMLP(D, o, dtype=dtype, rngs=rngs) for o in outs])

    def __call__(self, x: jax.Array, h: int, w: int) -> jax.Array:
        """x (B, h * w, D), row-major -> (B, h * w / 4**times, E)."""
        for mlp in self.mlp:
            blocks = blocks_2x2(x, h, w)
            x = mlp(blocks.reshape(*blocks.shape[:2], -1))
            h, w = h // 2, w // 2
        return x
