"""Gated MLP (SwiGLU and friends): down(act(gate(x)) * up(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmm.layers.linear import ROW, Linear

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class GatedMLP(nnx.Module):
    def __init__(self, D: int, F: int, act: str, *, bias: bool = False, dtype=jnp.float32, rngs):
        self.gate_proj = Linear(D, F, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(D, F, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(F, D, bias=bias, dtype=dtype, shard=ROW, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:  # x: (T, D)
        return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))
