"""RMSNorm with HF's numerics: normalise in float32, cast back, then scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-6, *, dtype=jnp.float32, offset: float = 0.0):
        self.eps = eps
        self.offset = offset  # Gemma-style (1 + w) norms set offset=1
        self.weight = nnx.Param(jnp.ones((dim,), dtype=dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...] + self.offset) * x32.astype(dtype)


class GemmaRMSNorm(nnx.Module):
    """Gemma's RMSNorm: scale (1 + w), applied in float32 before the cast back (HF's Gemma
    norms multiply first and cast last; Llama's cast first). Checkpoints store w, 0-centred."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.zeros((dim,), dtype=dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
