"""Phi-4-multimodal's audio encoder: a conformer over log-mel frames, HF names.

Mel frames (B, T, 80) -> global mean / inverse-std normalisation (`encoder_embedding`) ->
NeMo-style conv subsampling (`embed`: a 3x3 stride-2 conv, then depthwise + pointwise
stride-2 convs, `time_reduction` = 8 in all: C = ceil(T / 8) frames) -> conformer blocks
(`encoders`: half feed-forward, self-attention with a learned relative position bias,
GLU + causal depthwise conv module, half feed-forward, LayerNorm). Shape letters: B clips,
T mel frames, C encoder frames, D width, N heads, H head dim, F mel bins.

What transformers computes, reproduced as it is:
- the attention "mask" is added as numbers: HF adds the boolean streaming / padding mask
  to the float relative bias, so an allowed key gets +1 and a masked one +0 (a constant
  shift for a single unpadded clip: nothing is masked then);
- more than 500 encoder frames are cut into windows of 500 (the last one zero-padded and
  not masked), each attended within itself, and put back together;
- one clip at a time (HF's `mask=None` path): a batch of clips of different lengths in HF
  lets the padded frames of the shorter ones into attention, which per-clip encoding does
  not reproduce (nor should it).

Weights: the HF keys of the subsampling convs (`embed.conv.{i}`, a `nn.Sequential` with
activations in between) land on `embed.conv_{i}` (`hf_key_rules` of the owner).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.linear import ROW, Embed, Linear
from jaxmm.layers.mlp import activation
from jaxmm.models.encoders.clip import LayerNorm

MAX_WINDOW = 500  # HF's `max_seq_len`: encoder frames attended together


class Conv(nnx.Module):
    """A torch Conv1d / Conv2d under HF's names: `weight` (O, I / groups, *k), `bias` (O,)."""

    def __init__(self, shape: tuple, dtype, *, stride: int = 1, padding: int = 0, groups=1):
        self.weight = nnx.Param(jnp.zeros(shape, dtype=dtype))
        self.bias = nnx.Param(jnp.zeros((shape[0],), dtype=dtype))
        self.stride, self.padding, self.groups = stride, padding, groups

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, I, *spatial) -> (B, O, *spatial')."""
        w = self.weight[...]
        nd = w.ndim - 2
        dims = ("NCH", "OIH", "NCH") if nd == 1 else ("NCHW", "OIHW", "NCHW")
        y = jax.lax.conv_general_dilated(
            x.astype(w.dtype),
            w,
            window_strides=(self.stride,) * nd,
            padding=[(self.padding, self.padding)] * nd,
            dimension_numbers=dims,
            feature_group_count=self.groups,
            precision=jax.lax.Precision.HIGHEST,
        )
        return y + self.bias[...].reshape((1, -1) + (1,) * nd)


class Phi4MultimodalAudioMeanVarianceNormLayer(nnx.Module):
    def __init__(self, config, *, dtype):
        self.global_mean = nnx.Param(jnp.zeros((config.input_size,), dtype=dtype))
        self.global_invstd = nnx.Param(jnp.ones((config.input_size,), dtype=dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return (x - self.global_mean[...]) * self.global_invstd[...]


class Phi4MultimodalAudioNemoConvSubsampling(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        Cc = config.nemo_conv_channels
        self.act = activation(config.nemo_activation)
        self.num_stages = int(math.log2(config.time_reduction))
        # HF's Sequential indices: conv at 0, then (depthwise, pointwise, act) triples
        self.conv_0 = Conv((Cc, 1, 3, 3), dtype, stride=2, padding=1)
        for s in range(1, self.num_stages):
            i = 3 * s - 1
            setattr(self, f"conv_{i}", Conv((Cc, 1, 3, 3), dtype, stride=2, padding=1, groups=Cc))
            setattr(self, f"conv_{i + 1}", Conv((Cc, Cc, 1, 1), dtype))
        D = config.hidden_size
        self.out = Linear(Cc * config.nemo_final_size, D, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, T, F) -> (B, C, D)."""
        h = self.act(self.conv_0(x[:, None]))  # (B, Cc, T/2, F/2)
        for s in range(1, self.num_stages):
            i = 3 * s - 1
            h = self.act(getattr(self, f"conv_{i + 1}")(getattr(self, f"conv_{i}")(h)))
        B, Cc, C, Fr = h.shape
        return self.out(h.transpose(0, 2, 1, 3).reshape(B, C, Cc * Fr))


class Phi4MultimodalAudioRelativeAttentionBias(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.max_distance = config.bias_max_distance
        self.symmetric = config.bias_symmetric
        num_buckets = self.max_distance * (1 if self.symmetric else 2)
        self.num_buckets = num_buckets
        self.bias_values = Embed(num_buckets, config.num_attention_heads, dtype=dtype, rngs=rngs)

    def __call__(self, C: int) -> jax.Array:
        """-> (N, C, C): bias[n, query, key] by key - query, clipped to the table."""
        rel = np.arange(C)[None, :] - np.arange(C)[:, None]
        rel = np.clip(rel, -self.max_distance, self.max_distance - 1)
        idx = np.abs(rel) if self.symmetric else rel + self.num_buckets // 2
        return self.bias_values.embedding[...][jnp.asarray(idx)].transpose(2, 0, 1)


def streaming_mask(C: int, chunk_size: int, left_chunk: int) -> np.ndarray:
    """(C, C) bool: which keys each query sees under HF's chunked streaming mask (all of them
    when chunk_size <= 0, as `np.arange(0, C, chunk_size)` is then empty)."""
    starts = np.arange(0, C, chunk_size) if chunk_size > 0 else np.zeros(0, np.int64)
    start_pad = np.concatenate([[0], starts]).astype(np.int64)
    end_pad = np.concatenate([starts, [C]]).astype(np.int64)
    t = np.arange(C)[:, None]
    chunk = np.argmax((t < end_pad[None]) & (t >= start_pad[None]), axis=1)
    left = start_pad[np.maximum(chunk - left_chunk, 0)]
    right = end_pad[np.minimum(chunk, len(starts))]
    keys = np.arange(C)[None, :]
    return (keys >= left[:, None]) & (keys < right[:, None])


class Phi4MultimodalAudioMLP(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D, F = config.hidden_size, config.intermediate_size
        self.layer_norm = LayerNorm(D, dtype=dtype)
        self.gate_up_proj = Linear(D, 2 * F, bias=True, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(F, D, bias=True, dtype=dtype, shard=ROW, rngs=rngs)
        self.act = activation(config.activation)

    def __call__(self, x: jax.Array) -> jax.Array:
        up, gate = jnp.split(self.gate_up_proj(self.layer_norm(x)), 2, axis=-1)  # up first
        return self.down_proj(up * self.act(gate))


class Phi4MultimodalAudioAttention(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D = config.hidden_size
        self.N = config.num_attention_heads
        self.H = D // self.N
        self.q_proj = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(D, D, bias=True, dtype=dtype, shard=ROW, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x (B, C, D), bias (N, C, C) added to the scores."""
        B, C, _ = x.shape
        q = self.q_proj(x).reshape(B, C, self.N, self.H)
        k = self.k_proj(x).reshape(B, C, self.N, self.H)
        v = self.v_proj(x).reshape(B, C, self.N, self.H)
        scores = jnp.einsum("BQNH,BKNH->BNQK", q, k, precision=jax.lax.Precision.HIGHEST)
        scores = scores.astype(jnp.float32) * self.H**-0.5 + bias[None]
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("BNQK,BKNH->BQNH", probs, v, precision=jax.lax.Precision.HIGHEST)
        return self.o_proj(out.reshape(B, C, self.N * self.H))


class Phi4MultimodalAudioGluPointWiseConv(nnx.Module):
    def __init__(self, config, *, dtype):
        E = config.ext_pw_out_channel
        self.E = E
        self.ext_pw_conv_1d = Conv((2 * E, config.hidden_size, 1), dtype)
        self.b1 = nnx.Param(jnp.zeros((1, E, 1), dtype=dtype))
        self.b2 = nnx.Param(jnp.zeros((1, E, 1), dtype=dtype))
        self.act = activation(config.conv_glu_type)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, C, D) -> (B, C, E)."""
        h = self.ext_pw_conv_1d(x.transpose(0, 2, 1))  # (B, 2E, C)
        out = (h[:, : self.E] + self.b1[...]) * self.act(h[:, self.E :] + self.b2[...])
        return out.transpose(0, 2, 1)


class Phi4MultimodalAudioDepthWiseSeparableConv1d(nnx.Module):
    def __init__(self, config, *, dtype):
        D, m, k = config.hidden_size, config.depthwise_multiplier, config.kernel_size
        self.dw_conv = Conv((D * m, 1, k), dtype, padding=k - 1, groups=D)
        self.pw_conv = Conv((config.depthwise_separable_out_channel, D * m, 1), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, D, C) -> (B, D', C + k - 1)
        return self.pw_conv(self.dw_conv(x))


class Phi4MultimodalAudioConvModule(nnx.Module):
    def __init__(self, config, *, dtype):
        self.kernel_size = config.kernel_size
        self.layer_norm = LayerNorm(config.hidden_size, dtype=dtype)
        self.glu = Phi4MultimodalAudioGluPointWiseConv(config, dtype=dtype)
        self.dw_sep_conv_1d = Phi4MultimodalAudioDepthWiseSeparableConv1d(config, dtype=dtype)
        self.act = activation(config.conv_activation)
        self.ext_pw_conv_1d = Conv((config.ext_pw_out_channel, config.hidden_size, 1), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.dw_sep_conv_1d(self.glu(self.layer_norm(x)).transpose(0, 2, 1))
        if self.kernel_size > 1:  # padded both sides, the right side dropped: a causal conv
            h = h[:, :, : -(self.kernel_size - 1)]
        return self.ext_pw_conv_1d(self.act(h)).transpose(0, 2, 1)


class Phi4MultimodalAudioConformerEncoderLayer(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.feed_forward_in = Phi4MultimodalAudioMLP(config, dtype=dtype, rngs=rngs)
        self.self_attn = Phi4MultimodalAudioAttention(config, dtype=dtype, rngs=rngs)
        self.conv = Phi4MultimodalAudioConvModule(config, dtype=dtype)
        self.feed_forward_out = Phi4MultimodalAudioMLP(config, dtype=dtype, rngs=rngs)
        self.layer_norm_att = LayerNorm(config.hidden_size, dtype=dtype)
        self.layer_norm = LayerNorm(config.hidden_size, dtype=dtype)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        residual = x + 0.5 * self.feed_forward_in(x)
        x = residual + self.self_attn(self.layer_norm_att(residual), bias)
        x = x + self.conv(x)
        x = x + 0.5 * self.feed_forward_out(x)
        return self.layer_norm(x)


class Phi4MultimodalAudioModel(nnx.Module):
    def __init__(self, config, *, dtype=jnp.float32, rngs):
        self.config = config
        self.encoder_embedding = Phi4MultimodalAudioMeanVarianceNormLayer(config, dtype=dtype)
        self.embed = Phi4MultimodalAudioNemoConvSubsampling(config, dtype=dtype, rngs=rngs)
        self.relative_attention_bias_layer = Phi4MultimodalAudioRelativeAttentionBias(
            config, dtype=dtype, rngs=rngs
        )
        self.encoders = nnx.List(
            [
                Phi4MultimodalAudioConformerEncoderLayer(config, dtype=dtype, rngs=rngs)
                for _ in range(config.num_blocks)
            ]
        )

    def __call__(self, features: jax.Array) -> jax.Array:
        """features (B, T, F) of clips of T frames each -> (B, C, D), C = ceil(T / 8)."""
        x = self.embed(self.encoder_embedding(features))  # (B, C, D)
        B, C, D = x.shape
        W = C
        if C > MAX_WINDOW:  # windows of 500 frames, the last zero-padded (unmasked, as HF)
            W = MAX_WINDOW
            pad = -C % W
            x = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(-1, W, D)
        c = self.config
        allowed = streaming_mask(W, c.chunk_size, c.left_chunk)
        # HF adds the boolean mask to the float bias: +1 where a key is allowed
        bias = self.relative_attention_bias_layer(W) + jnp.asarray(allowed, jnp.float32)[None]
        for layer in self.encoders:
            x = layer(x, bias)
        return x.reshape(B, -1, D)[:, :C]
