"""The Gemma 4 vision tower (HF `Gemma4VisionModel`), with HF names.

Its image processor resizes each image (aspect ratio kept) to a multiple of k x p pixels that
fits a patch budget, cuts it into p x p patches and pads the list to the budget (P patches):
`pixel_values` (P, 3 p^2) and `image_position_ids` (P, 2) = the (x, y) of each patch, (-1, -1)
for padding. So every image has the same shape here and one program serves any size.

1. Patch embedding: pixels scaled to [-1, 1], one matmul, plus learned x and y position
   embeddings (zero on padding).
2. Encoder layers (Gemma 4's text layer without PLE): q/k RMSNorm with scale, v RMSNorm
   without, attention scale 1, 2-D RoPE (the first half of each head rotates with x, the
   second with y), bidirectional attention that ignores padding keys.
3. Pooling: patches averaged over k x k cells by position (HF's one-hot matmul), times
   sqrt(D), in float32; cell i of an image with w patches across is
   (x // k) + (w // k) * (y // k), so an image's n = patches / k^2 soft tokens are the
   first n rows. Optionally standardised (`std_bias`, `std_scale`).

`Gemma4ClippableLinear` clamps its input and output where the checkpoint says
(`use_clipped_linears`: the bounds are tensors of the checkpoint).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.attention import dense_attention
from jaxmm.layers.linear import ROW, Linear
from jaxmm.layers.mlp import activation
from jaxmm.layers.rope import rotate_half


class Gemma4RMSNorm(nnx.Module):
    """Gemma 4's RMSNorm: x * (mean(x^2) + eps)^-0.5 * w, all in float32, then cast back
    (w itself, not Gemma 3's 1 + w); `with_scale=False` has no weight."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype=jnp.float32, with_scale=True):
        self.eps = eps
        self.with_scale = with_scale
        if with_scale:
            self.weight = nnx.Param(jnp.ones((dim,), dtype=dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.with_scale:
            x32 = x32 * self.weight[...].astype(jnp.float32)
        return x32.astype(x.dtype)


class Gemma4ClippableLinear(nnx.Module):
    def __init__(self, config, din: int, dout: int, *, dtype, shard=None, rngs):
        kw = {"shard": shard} if shard else {}
        self.linear = Linear(din, dout, dtype=dtype, rngs=rngs, **kw)
        self.clipped = bool(getattr(config, "use_clipped_linears", False))
        if self.clipped:
            self.input_min = nnx.Param(jnp.array(-jnp.inf, dtype))
            self.input_max = nnx.Param(jnp.array(jnp.inf, dtype))
            self.output_min = nnx.Param(jnp.array(-jnp.inf, dtype))
            self.output_max = nnx.Param(jnp.array(jnp.inf, dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.clipped:
            x = jnp.clip(x, self.input_min[...], self.input_max[...])
        y = self.linear(x)
        if self.clipped:
            y = jnp.clip(y, self.output_min[...], self.output_max[...])
        return y


class Gemma4VisionPatchEmbedder(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D, p = config.hidden_size, config.patch_size
        self.input_proj = Linear(3 * p * p, D, dtype=dtype, rngs=rngs)
        self.position_embedding_table = nnx.Param(
            jnp.ones((2, config.position_embedding_size, D), dtype)
        )

    def __call__(self, pixels, positions, padding):
        """pixels (B, P, 3p^2), positions (B, P, 2), padding (B, P) -> (B, P, D)."""
        h = self.input_proj((2 * (pixels - 0.5)).astype(self.input_proj.kernel.dtype))
        table = self.position_embedding_table[...]
        pos = jnp.maximum(positions, 0)
        emb = table[0][pos[..., 0]] + table[1][pos[..., 1]]
        return h + jnp.where(padding[..., None], 0.0, emb).astype(h.dtype)


class Gemma4VisionAttention(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D, eps = config.hidden_size, config.rms_norm_eps
        self.N, self.K = config.num_attention_heads, config.num_key_value_heads
        self.H = getattr(config, "head_dim", None) or D // self.N
        self.q_proj = Gemma4ClippableLinear(config, D, self.N * self.H, dtype=dtype, rngs=rngs)
        self.k_proj = Gemma4ClippableLinear(config, D, self.K * self.H, dtype=dtype, rngs=rngs)
        self.v_proj = Gemma4ClippableLinear(config, D, self.K * self.H, dtype=dtype, rngs=rngs)
        self.o_proj = Gemma4ClippableLinear(
            config, self.N * self.H, D, dtype=dtype, shard=ROW, rngs=rngs
        )
        self.q_norm = Gemma4RMSNorm(self.H, eps, dtype=dtype)
        self.k_norm = Gemma4RMSNorm(self.H, eps, dtype=dtype)
        self.v_norm = Gemma4RMSNorm(self.H, eps, dtype=dtype, with_scale=False)

    def __call__(self, x, cos, sin, bias):
        B, P, _ = x.shape
        q = _rope_2d(self.q_norm(self.q_proj(x).reshape(B, P, self.N, self.H)), cos, sin)
        k = _rope_2d(self.k_norm(self.k_proj(x).reshape(B, P, self.K, self.H)), cos, sin)
        v = self.v_norm(self.v_proj(x).reshape(B, P, self.K, self.H))
        if self.K != self.N:
            k, v = (jnp.repeat(t, self.N // self.K, axis=2) for t in (k, v))
        out = dense_attention(q, k, v, causal=False, sm_scale=1.0, bias=bias)
        return self.o_proj(out.reshape(B, P, self.N * self.H))


def _rope_2d(x, cos, sin):
    """x (B, P, N, H); cos/sin (B, P, H) laid out [x, x, y, y]: each half of a head turns by
    one coordinate (HF's apply_multidimensional_rope with two dimensions)."""
    half = x.shape[-1] // 2
    parts = []
    for a in (0, half):
        c = cos[:, :, None, a : a + half].astype(x.dtype)
        s = sin[:, :, None, a : a + half].astype(x.dtype)
        xp = x[..., a : a + half]
        parts.append(xp * c + rotate_half(xp) * s)
    return jnp.concatenate(parts, axis=-1)


class Gemma4VisionMLP(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D, F = config.hidden_size, config.intermediate_size
        self.gate_proj = Gemma4ClippableLinear(config, D, F, dtype=dtype, rngs=rngs)
        self.up_proj = Gemma4ClippableLinear(config, D, F, dtype=dtype, rngs=rngs)
        self.down_proj = Gemma4ClippableLinear(config, F, D, dtype=dtype, shard=ROW, rngs=rngs)
        self.act = config.hidden_activation

    def __call__(self, x):
        return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


class Gemma4VisionEncoderLayer(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma4VisionAttention(config, dtype=dtype, rngs=rngs)
        self.mlp = Gemma4VisionMLP(config, dtype=dtype, rngs=rngs)
        self.input_layernorm = Gemma4RMSNorm(D, eps, dtype=dtype)
        self.post_attention_layernorm = Gemma4RMSNorm(D, eps, dtype=dtype)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(D, eps, dtype=dtype)
        self.post_feedforward_layernorm = Gemma4RMSNorm(D, eps, dtype=dtype)

    def __call__(self, x, cos, sin, bias):
        h = self.self_attn(self.input_layernorm(x), cos, sin, bias)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Gemma4VisionEncoder(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.layers = nnx.List(
            [
                Gemma4VisionEncoderLayer(config, dtype=dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )


class Gemma4VisionModel(nnx.Module):
    def __init__(self, config, *, dtype=jnp.float32, rngs):
        self.patch_embedder = Gemma4VisionPatchEmbedder(config, dtype=dtype, rngs=rngs)
        self.encoder = Gemma4VisionEncoder(config, dtype=dtype, rngs=rngs)
        self.standardize = bool(getattr(config, "standardize", False))
        D = config.hidden_size
        if self.standardize:
            self.std_bias = nnx.Param(jnp.zeros((D,), dtype))
            self.std_scale = nnx.Param(jnp.ones((D,), dtype))
        H = getattr(config, "head_dim", None) or D // config.num_attention_heads
        theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 100.0))
        spatial = H // 2
        inv = 1.0 / (theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
        self.inv_freq = tuple(float(f) for f in inv.astype(np.float32))
        self.k = int(config.pooling_kernel_size)
        self.D = D

    def __call__(self, pixels: jax.Array, positions: jax.Array) -> jax.Array:
        """pixels (B, P, 3p^2), positions (B, P, 2) -> pooled (B, P / k^2, D) in the model
        dtype; an image's soft tokens are its first rows (see the module docstring)."""
        B, P, _ = pixels.shape
        positions = positions.astype(jnp.int32)
        padding = jnp.all(positions == -1, axis=-1)  # (B, P)
        x = self.patch_embedder(pixels, positions, padding)
        # 2-D RoPE: angles per coordinate, laid out [x, x, y, y] over the head
        freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(self.inv_freq)
        fx, fy = freqs[:, :, 0], freqs[:, :, 1]
        emb = jnp.concatenate([fx, fx, fy, fy], axis=-1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        bias = jnp.where(padding, -jnp.inf, 0.0)[:, None, None, :]  # padding keys masked
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, bias)
        return self.pool(x, positions, padding)

    def pool(self, x, positions, padding):
        B, P, D = x.shape
        k, n = self.k, P // (self.k * self.k)
        x = jnp.where(padding[..., None], 0.0, x)
        if n != P:
            pos = jnp.maximum(positions, 0)
            width = jnp.max(pos[..., 0], axis=-1, keepdims=True) + 1  # patches across
            cell = pos[..., 0] // k + (width // k) * (pos[..., 1] // k)  # (B, P)
            weights = jax.nn.one_hot(cell, n, dtype=jnp.float32) / (k * k)  # (B, P, n)
            x = jnp.einsum("BPn,BPD->BnD", weights, x.astype(jnp.float32)).astype(x.dtype)
        out = x.astype(jnp.float32) * (self.D**0.5)
        if self.standardize:
            bias = self.std_bias[...].astype(jnp.float32)
            out = (out - bias) * self.std_scale[...].astype(jnp.float32)
        return out.astype(x.dtype)
