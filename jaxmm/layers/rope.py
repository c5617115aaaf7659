"""Rotary position embeddings (HF "rotate_half" layout) with rope_scaling variants.

Supported `rope_type`s: default, linear, llama3. Any other type is a clear error at load
time, not a silent mismatch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(hf_config) -> dict:
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy = getattr(hf_config, "rope_scaling", None) or {}
    for k, v in legacy.items():
        params.setdefault(k, v)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inv_frequencies(head_dim: int, params: dict, rotary_dim: int | None = None) -> np.ndarray:
    """(H/2,) inverse frequencies in float64 -> float32, following HF's rope init functions."""
    dim = rotary_dim or head_dim
    base = float(params["rope_theta"])
    inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv = inv / float(params["factor"])
    elif rope_type == "llama3":
        factor = float(params["factor"])
        low = float(params["low_freq_factor"])
        high = float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv
        inv_l = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(is_medium, smoothed, inv_l)
    else:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return inv.astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def cos_sin(positions: jax.Array, inv_freq: jax.Array):
    """positions (T,) -> cos, sin (T, H) in float32."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (T, N, H); cos/sin (T, H). Computed in x's dtype like HF."""
    cos = cos[:, None, :].astype(x.dtype)
    sin = sin[:, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin
