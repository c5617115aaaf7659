"""Qwen3-VL vision transformer, HF names, one packed batch per call.

The Qwen2-VL tower (`qwen2_vl_vision.py`: packed patches, attention confined to frames,
2D rotary over (row, col)) with three changes:

1. learned position embeddings: a (side, side) table (`pos_embed`, side^2 =
   num_position_embeddings) resampled bilinearly (align_corners) to each frame's (h, w)
   patch grid and added after the patch embedding. The four taps and weights of every patch
   are computed on the host (`interpolation_taps`, float32 like transformers) and gathered
   on the device, so one program serves every grid of a bucket;
2. a LayerNorm + fc1/fc2 MLP (gelu-tanh) per block, a patch merger with a LayerNorm before
   the 2x2 concatenation, and a biased patch-embedding conv;
3. DeepStack: the outputs of blocks `deepstack_visual_indexes` each go through their own
   merger (LayerNorm after the concatenation) and come back with the main features,
   concatenated along D: merged rows are (N / m^2, D_out * (1 + len(deepstack))), the
   layout the encoder cache keeps and the language model splits (`qwen3_vl.py`).

Shape letters: N patches (packed), D width, K patch pixels, m merge size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.linear import Embed, Linear
from jaxmm.layers.mlp import activation
from jaxmm.models.encoders.clip import LayerNorm
from jaxmm.models.encoders.qwen2_vl_vision import (
    Segments,
    VisionAttention,
    pack,
    patch_positions,
)


class PatchConv(nnx.Module):
    """HF's Conv3d (stride == kernel) with its bias: a matmul per patch."""

    def __init__(self, vc, *, dtype):
        shape = (vc.hidden_size, vc.in_channels, vc.temporal_patch_size)
        shape += (vc.patch_size, vc.patch_size)
        self.weight = nnx.Param(jnp.zeros(shape, dtype=dtype))
        self.bias = nnx.Param(jnp.zeros((vc.hidden_size,), dtype=dtype))


class Qwen3VLVisionPatchEmbed(nnx.Module):
    def __init__(self, vc, *, dtype):
        self.proj = PatchConv(vc, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:  # (N, K) -> (N, D)
        w = self.proj.weight[...]
        out = jnp.einsum("NK,DK->ND", x.astype(w.dtype), w.reshape(w.shape[0], -1))
        return out + self.proj.bias[...]


class Qwen3VLVisionMLP(nnx.Module):
    def __init__(self, vc, *, dtype, rngs):
        D, F = vc.hidden_size, vc.intermediate_size
        self.linear_fc1 = Linear(D, F, bias=True, dtype=dtype, rngs=rngs)
        self.linear_fc2 = Linear(F, D, bias=True, dtype=dtype, rngs=rngs)
        self.act = vc.hidden_act

    def __call__(self, x):
        return self.linear_fc2(activation(self.act)(self.linear_fc1(x)))


class Qwen3VLVisionBlock(nnx.Module):
    def __init__(self, vc, *, dtype, rngs):
        self.norm1 = LayerNorm(vc.hidden_size, 1e-6, dtype=dtype)
        self.norm2 = LayerNorm(vc.hidden_size, 1e-6, dtype=dtype)
        self.attn = VisionAttention(vc.hidden_size, vc.num_heads, dtype=dtype, rngs=rngs)
        self.mlp = Qwen3VLVisionMLP(vc, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, segs: Segments, implementation: str = "xla"):
        x = x + self.attn(self.norm1(x), cos, sin, segs, implementation)
        return x + self.mlp(self.norm2(x))


class Qwen3VLVisionPatchMerger(nnx.Module):
    """m x m neighbourhoods concatenated and projected to the LM width; the LayerNorm runs
    per patch (main merger) or on the concatenation (DeepStack mergers: postshuffle)."""

    def __init__(self, vc, *, postshuffle: bool, dtype, rngs):
        D = vc.hidden_size
        self.hidden = D * vc.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.norm = LayerNorm(self.hidden if postshuffle else D, 1e-6, dtype=dtype)
        self.linear_fc1 = Linear(self.hidden, self.hidden, bias=True, dtype=dtype, rngs=rngs)
        self.linear_fc2 = Linear(self.hidden, vc.out_hidden_size, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x):  # (N, D) -> (N / m^2, D_out)
        if self.postshuffle:
            x = self.norm(x.reshape(-1, self.hidden))
        else:
            x = self.norm(x).reshape(-1, self.hidden)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class Qwen3VLVisionModel(nnx.Module):
    windowed = False  # attention within frames only

    def __init__(self, vc, *, dtype=jnp.float32, rngs):
        self.config = vc
        D = vc.hidden_size
        self.patch_embed = Qwen3VLVisionPatchEmbed(vc, dtype=dtype)
        self.pos_embed = Embed(vc.num_position_embeddings, D, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List(
            [Qwen3VLVisionBlock(vc, dtype=dtype, rngs=rngs) for _ in range(vc.depth)]
        )
        self.merger = Qwen3VLVisionPatchMerger(vc, postshuffle=False, dtype=dtype, rngs=rngs)
        self.deepstack_visual_indexes = tuple(int(i) for i in vc.deepstack_visual_indexes)
        self.deepstack_merger_list = nnx.List(
            [
                Qwen3VLVisionPatchMerger(vc, postshuffle=True, dtype=dtype, rngs=rngs)
                for _ in self.deepstack_visual_indexes
            ]
        )
        head_dim = D // vc.num_heads
        params = getattr(vc, "rope_parameters", None) or {}
        theta = float(params.get("rope_theta", 10000.0))
        spatial = head_dim // 2
        inv = 1.0 / (
            theta ** (np.arange(0, spatial, 2, dtype=np.int64).astype(np.float32) / spatial)
        )
        self.inv_freq = tuple(float(f) for f in inv.astype(np.float32))

    @staticmethod
    def width(vc) -> int:
        return vc.hidden_size

    @staticmethod
    def out_width(vc) -> int:
        """Width of a merged row: the main features and each DeepStack level's."""
        return vc.out_hidden_size * (1 + len(vc.deepstack_visual_indexes))

    def __call__(
        self,
        pixels,
        pos,
        full: Segments,
        window=None,
        order=None,
        implementation: str = "xla",
        *,
        interp_index,
        interp_weight,
    ):
        """pixels (N, K), pos (N, 2) (row, col), full: one segment per frame, interp_index /
        interp_weight (N, 4) the position table's taps -> merged (N / m^2, D_out * (1 + k)).

        `window` and `order` are Qwen2.5-VL's and unused here (no window attention)."""
        del window, order
        x = self.patch_embed(pixels)
        table = self.pos_embed.embedding[...]
        # float32 like HF's (table * float32 weights).sum(1), then the model's dtype
        taps = table[interp_index].astype(jnp.float32) * interp_weight[:, :, None]
        x = x + taps.sum(axis=1).astype(x.dtype)
        inv = jnp.asarray(np.array(self.inv_freq, np.float32))
        freqs = pos.astype(jnp.float32)[:, :, None] * inv  # (N, 2, Hd/4): h then w
        freqs = freqs.reshape(freqs.shape[0], -1)
        emb = jnp.concatenate([freqs, freqs], axis=-1)  # (N, Hd)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full, implementation)
            if i in self.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(x))
        return jnp.concatenate([self.merger(x), *deepstack], axis=-1)


# ---------------------------------------------------------------------------------------
# Host side: the position table's bilinear taps, packed with the rest of a call's inputs


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear (align_corners) taps into a `side`-long axis for positions `index` of an axis
    of `size`: (n, 2) indices and weights, in float32 as transformers computes them."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    return taps, np.maximum(np.float32(1) - distance, 0).astype(np.float32)


def interpolation_taps(t: int, h: int, w: int, m: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(t*h*w, 4) indices into the flattened (side, side) table and their weights, for the
    patches of a (t, h, w) grid in the processor's m x m block-major order."""
    pos = patch_positions(1, h, w, m)
    h_taps, h_w = _axis_taps(pos[:, 0], h, side)
    w_taps, w_w = _axis_taps(pos[:, 1], w, side)
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return np.tile(index, (t, 1)).astype(np.int32), np.tile(weight, (t, 1))


def pack_with_taps(items: list[tuple[np.ndarray, tuple]], vc) -> dict:
    """`pack` (one segment per frame) plus each packed patch's position-table taps, padded
    to the call's patch bucket (padding patches read row 0 with weight 0)."""
    b = pack(items, vc, False)
    side = int(round(vc.num_position_embeddings**0.5))
    m = vc.spatial_merge_size
    parts = [interpolation_taps(t, h, w, m, side) for _, (t, h, w) in items]
    N, Nb = sum(len(i) for i, _ in parts), len(b["pos"])  # real patches, the call's bucket
    index = np.zeros((Nb, 4), np.int32)
    weight = np.zeros((Nb, 4), np.float32)
    index[:N] = np.concatenate([i for i, _ in parts])
    weight[:N] = np.concatenate([w for _, w in parts])
    b["extra"] = {"interp_index": index, "interp_weight": weight}
    return b
