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
   and LayerNorm-ed, through an MLP to one row, plus their mean: (h, w) -> (h/2, w/2).
   The layers after it run on the smaller grid.
3. The merger (`MiniCPMV4_6Merger`): after `post_layernorm`, 2x2 blocks of rows are
   concatenated and projected (`merger_times` rounds, the last into the text width).

The trick that keeps shapes few: a sub-image's patches enter in block-major order
(`block_order`): each output row's 4^L patches are consecutive, each 2x2 group of a merge
level innermost first. Attention does not care about order (positions are added once, at
the embeddings), so every 2x2 merge is a reshape of 4 consecutive rows, the grid never
enters the program, and sub-images of any size share a call padded to a patch-count
bucket, their padding masked out of attention (`lens`) and dropped from the output.
A sub-image of (h, w) patches gives h * w / 16 rows ("16x") or h * w / 4 ("4x").
Shape letters: B sub-images, C patches per sub-image (padded), D tower width, E text width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.linear import Embed, Linear
from jaxmm.layers.mlp import activation
from jaxmm.models.encoders.clip import LayerNorm
from jaxmm.models.encoders.qwen2_vl_vision import _xla_attention
from jaxmm.models.encoders.siglip import PatchConv, SiglipAttention, SiglipMLP


def position_ids(h: int, w: int, side: int) -> np.ndarray:
    """(h * w,) rows of the side x side position table for an (h, w) patch grid, row-major,
    as transformers' `get_vision_nearest_position_ids` picks them (float32, as torch's)."""
    step = 1.0 / side
    count = int(np.ceil((1.0 - step) / step))  # torch.arange(step, 1.0, step)'s length
    bounds = ((np.arange(count, dtype=np.float64) + 1) * step).astype(np.float32)

    def bucket(n: int) -> np.ndarray:
        coords = np.arange(n, dtype=np.float32) / np.float32(n)
        return np.searchsorted(bounds, coords, side="right")

    return (bucket(h)[:, None] * side + bucket(w)[None, :]).reshape(-1)


def block_order(h: int, w: int, levels: int) -> np.ndarray:
    """(h * w,) row-major patch indices in block-major order for `levels` 2x2 merges: the
    4**levels patches of each output row (output rows row-major) consecutive, a level's
    four children in (dy, dx) row-major order, the first merge's groups innermost."""
    a = np.arange(h * w).reshape(h, w, 1)
    for _ in range(levels):
        H, W, k = a.shape
        a = (
            a.reshape(H // 2, 2, W // 2, 2, k)
            .transpose(0, 2, 1, 3, 4)
            .reshape(H // 2, W // 2, 4 * k)
        )
    return a.reshape(-1)


class MiniCPMVAttention(SiglipAttention):
    """SigLIP's attention with each sub-image's keys cut at its length (`lens` (B,))."""

    def __call__(self, x: jax.Array, lens: jax.Array | None = None) -> jax.Array:
        B, C, _ = x.shape
        if lens is None:
            lens = jnp.full((B,), C, jnp.int32)
        q = self.q_proj(x).reshape(B, C, self.N, self.H)
        k = self.k_proj(x).reshape(B, C, self.N, self.H)
        v = self.v_proj(x).reshape(B, C, self.N, self.H)
        scale = self.H**-0.5
        if self.implementation == "cudnn":
            out = jax.nn.dot_product_attention(  # padding queries: never read back
                q,
                k,
                v,
                scale=scale,
                query_seq_lengths=lens,
                key_value_seq_lengths=lens,
                implementation="cudnn",
            )
        else:
            out = _xla_attention(q, k, v, lens, scale)
        return self.out_proj(out.reshape(B, C, self.N * self.H))


class MiniCPMVEncoderLayer(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        eps = config.layer_norm_eps
        self.layer_norm1 = LayerNorm(config.hidden_size, eps, dtype=dtype)
        self.self_attn = MiniCPMVAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps, dtype=dtype)
        self.mlp = SiglipMLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, lens: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), lens)
        return x + self.mlp(self.layer_norm2(x))


class MiniCPMVEncoder(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.layers = nnx.List(
            [
                MiniCPMVEncoderLayer(config, dtype=dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )


class MiniCPMVVisionEmbeddings(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D, C, p = config.hidden_size, config.num_channels, config.patch_size
        self.side = config.image_size // p
        self.patch_embedding = PatchConv(D, C, p, dtype)
        self.position_embedding = Embed(self.side**2, D, dtype=dtype, rngs=rngs)

    def __call__(self, patches: jax.Array, pos: jax.Array) -> jax.Array:
        """patches (B, C, 3 * p * p), pos (B, C) position-table rows -> (B, C, D)."""
        wt = self.patch_embedding.weight[...]
        x = jnp.einsum("BCK,DK->BCD", patches.astype(wt.dtype), wt.reshape(wt.shape[0], -1))
        x = x + self.patch_embedding.bias[...]
        return x + self.position_embedding.embedding[...][pos]


class MiniCPMVWindowMerger(nnx.Module):
    """`MiniCPMV4_6ViTWindowAttentionMerger`: 2x2 window attention, then each window -> 1."""

    def __init__(self, config, *, dtype, rngs):
        D, eps = config.hidden_size, config.layer_norm_eps
        kh, kw = config.window_kernel_size
        if (kh, kw) != (2, 2):
            raise ValueError(f"window_kernel_size {(kh, kw)} is not supported; jaxmm takes (2, 2)")
        self.self_attn = MiniCPMVAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(D, eps, dtype=dtype)
        self.pre_norm = LayerNorm(4 * D, eps, dtype=dtype)
        F = 4 * config.intermediate_size
        self.linear_1 = Linear(4 * D, F, bias=True, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(F, D, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, C, D), windows of 4 consecutive patches -> (B, C/4, D)."""
        B, C, D = x.shape
        windows = x.reshape(B, C // 4, 4, D)  # the residual
        attn = self.self_attn(self.layer_norm1(windows.reshape(B * C // 4, 4, D)))
        windows = windows + attn.reshape(B, C // 4, 4, D)
        out = self.linear_1(self.pre_norm(windows.reshape(B, C // 4, 4 * D)))
        out = self.linear_2(activation("gelu_pytorch_tanh")(out))
        return out + windows.mean(axis=2)


class MiniCPMVVisionModel(nnx.Module):
    def __init__(self, config, *, dtype=jnp.float32, rngs):
        self.insert_layer_id = int(config.insert_layer_id)
        self.embeddings = MiniCPMVVisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = MiniCPMVEncoder(config, dtype=dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype)
        self.vit_merger = MiniCPMVWindowMerger(config, dtype=dtype, rngs=rngs)

    def __call__(
        self, patches: jax.Array, pos: jax.Array, lens: jax.Array, use_vit_merger: bool
    ) -> jax.Array:
        """patches (B, C, 3 * p * p) in block-major order, pos (B, C), lens (B,) valid
        patches -> post-normed rows (B, C/4, D) with the window merger, else (B, C, D)."""
        x = self.embeddings(patches, pos)
        merge_at = self.insert_layer_id if use_vit_merger else -1
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x, lens)  # the whole sub-image, both ways
            if i == merge_at:
                x = self.vit_merger(x)
                lens = lens // 4
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

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, C, D), 2x2 blocks of 4 consecutive rows -> (B, C / 4**times, E)."""
        for mlp in self.mlp:
            B, C, D = x.shape
            x = mlp(x.reshape(B, C // 4, 4 * D))
        return x
