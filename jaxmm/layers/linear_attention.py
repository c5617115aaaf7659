"""Gated DeltaNet, the linear-attention token mixer of Qwen3.5 (HF names and numerics).

x -> in_proj_qkv -> causal conv1d (SiLU) -> q, k, v; in_proj_z -> the output gate z;
in_proj_b -> beta = sigmoid(b); in_proj_a -> log-decay g = -exp(A_log) * softplus(a + dt_bias).
q and k are L2-normalised (q also scaled by Hk^-0.5), the key heads repeated to the value
heads, and the gated delta rule runs with each sequence's recurrent state; the output is
RMS-normalised per head, gated by SiLU(z), and projected back by out_proj.

Per sequence the layer keeps two states in slots (`jaxmm.engine.state_cache`): the conv
state `(W - 1, E)` (the last inputs of the convolution, E = 2 * Nk * Hk + N * Hv channels)
and the recurrent state `(N, Hk, Hv)`, kept in float32 whatever the model's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmm.kernels.gated_delta import l2norm, ragged_conv1d, ragged_gated_delta
from jaxmm.layers.linear import ROW, Linear


class GatedRMSNorm(nnx.Module):
    """RMSNorm over the head dimension, then times SiLU(gate) (HF's Qwen3_5RMSNormGated)."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype=dtype))

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        out = self.weight[...] * x32.astype(dtype)
        return (out * jax.nn.silu(gate.astype(jnp.float32))).astype(dtype)


class DepthwiseConv1d(nnx.Module):
    """The weight of a depthwise convolution, as HF stores it: (E, 1, W)."""

    def __init__(self, channels: int, width: int, *, dtype):
        self.weight = nnx.Param(jnp.zeros((channels, 1, width), dtype=dtype))


class GatedDeltaNet(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D = config.hidden_size
        self.Nk = config.linear_num_key_heads
        self.N = config.linear_num_value_heads
        self.Hk = config.linear_key_head_dim
        self.Hv = config.linear_value_head_dim
        self.W = config.linear_conv_kernel_dim
        self.key_dim = self.Nk * self.Hk
        self.value_dim = self.N * self.Hv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.act = config.hidden_act
        self.in_proj_qkv = Linear(D, self.conv_dim, dtype=dtype, rngs=rngs)
        self.in_proj_z = Linear(D, self.value_dim, dtype=dtype, rngs=rngs)
        self.in_proj_b = Linear(D, self.N, dtype=dtype, rngs=rngs)
        self.in_proj_a = Linear(D, self.N, dtype=dtype, rngs=rngs)
        self.conv1d = DepthwiseConv1d(self.conv_dim, self.W, dtype=dtype)
        self.dt_bias = nnx.Param(jnp.ones((self.N,), dtype=dtype))
        self.A_log = nnx.Param(jnp.zeros((self.N,), dtype=dtype))
        self.norm = GatedRMSNorm(self.Hv, config.rms_norm_eps, dtype=dtype)
        self.out_proj = Linear(self.value_dim, D, dtype=dtype, shard=ROW, rngs=rngs)

    def state_shapes(self, dtype) -> list[tuple[tuple[int, ...], jnp.dtype]]:
        """Per-slot (shape, dtype) of the conv state and of the recurrent state."""
        return [
            ((self.W - 1, self.conv_dim), jnp.dtype(dtype)),
            ((self.N, self.Hk, self.Hv), jnp.float32),
        ]

    def __call__(self, x, conv_states, rec_states, slots, cu_q_lens, has_state):
        """x (T, D); conv_states (slots + 1, W - 1, E); rec_states (slots + 1, N, Hk, Hv);
        slots, has_state (S,); cu_q_lens (S+1,) -> out (T, D), conv_states, rec_states."""
        T = x.shape[0]
        mixed = self.in_proj_qkv(x)  # (T, E)
        z = self.in_proj_z(x).reshape(T, self.N, self.Hv)
        beta = jax.nn.sigmoid(self.in_proj_b(x)).astype(jnp.float32)  # (T, N)
        a = self.in_proj_a(x).astype(jnp.float32)
        A = jnp.exp(self.A_log[...].astype(jnp.float32))
        g = -A * jax.nn.softplus(a + self.dt_bias[...].astype(jnp.float32))  # (T, N) log-decay
        act = jax.nn.silu if self.act in ("silu", "swish") else None
        if act is None:
            raise ValueError(f"Gated DeltaNet's convolution supports SiLU only, not {self.act!r}")
        weight = self.conv1d.weight[...][:, 0, :]  # (E, W)
        mixed, conv_states = ragged_conv1d(
            mixed, weight, conv_states, slots, cu_q_lens, has_state, activation=act
        )
        q, k, v = jnp.split(mixed, [self.key_dim, 2 * self.key_dim], axis=-1)
        rep = self.N // self.Nk  # each key head serves `rep` consecutive value heads
        q = jnp.repeat(q.reshape(T, self.Nk, self.Hk), rep, axis=1)
        k = jnp.repeat(k.reshape(T, self.Nk, self.Hk), rep, axis=1)
        v = v.reshape(T, self.N, self.Hv)
        q = l2norm(q) * self.Hk**-0.5
        k = l2norm(k)
        out, rec_states = ragged_gated_delta(
            q, k, v, g, beta, rec_states, slots, cu_q_lens, has_state
        )
        out = self.norm(out.astype(x.dtype), z)  # (T, N, Hv)
        return self.out_proj(out.reshape(T, self.value_dim)), conv_states, rec_states
