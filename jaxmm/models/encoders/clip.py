"""CLIP vision tower (LLaVA's image encoder), HF names, dense attention.

Embeddings (patch conv as a matmul + CLS + learned positions) -> pre_layrnorm ->
EncoderLayer x L. `__call__` returns the hidden states HF calls `hidden_states`:
index 0 is the input of the first layer, index i the output of layer i, so LLaVA's
`vision_feature_layer=-2` picks the same tensor. Layers past the deepest one asked for are
not run (their weights load, their compute is skipped). Shape letters: B images,
C tokens per image (1 + patches), D width, N heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmm.layers.attention import dense_attention
from jaxmm.layers.linear import ROW, Embed, Linear
from jaxmm.layers.mlp import activation


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm with HF names (`weight`, `bias`), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5, *, dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype=dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype=dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...] + self.bias[...]).astype(x.dtype)


class ConvWeight(nnx.Module):
    """Holds a conv kernel under HF's name `weight` (not transposed like a Linear's)."""

    def __init__(self, shape: tuple, dtype):
        self.weight = nnx.Param(jnp.zeros(shape, dtype=dtype))


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D, C, p = config.hidden_size, config.num_channels, config.patch_size
        self.patch_size = p
        self.class_embedding = nnx.Param(jnp.zeros((D,), dtype=dtype))
        # the Conv2d weight in HF layout (D, C, p, p); stride == kernel, so a matmul per patch
        self.patch_embedding = ConvWeight((D, C, p, p), dtype)
        num_positions = (config.image_size // p) ** 2 + 1
        self.position_embedding = Embed(num_positions, D, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values (B, C, Hpx, Wpx) -> (B, 1 + P, D)."""
        B, Cin, Hpx, Wpx = pixel_values.shape
        p = self.patch_size
        x = pixel_values.reshape(B, Cin, Hpx // p, p, Wpx // p, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(B, (Hpx // p) * (Wpx // p), Cin * p * p)
        w = self.patch_embedding.weight[...]
        patches = jnp.einsum("BPK,DK->BPD", x.astype(w.dtype), w.reshape(w.shape[0], -1))
        cls = jnp.broadcast_to(self.class_embedding[...], (B, 1, w.shape[0]))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding.embedding[...][None, : x.shape[1]]


class CLIPAttention(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D = config.hidden_size
        self.N = config.num_attention_heads
        self.H = D // self.N
        self.q_proj = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(D, D, bias=True, dtype=dtype, shard=ROW, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # x: (B, C, D)
        B, C, _ = x.shape
        q = self.q_proj(x).reshape(B, C, self.N, self.H)
        k = self.k_proj(x).reshape(B, C, self.N, self.H)
        v = self.v_proj(x).reshape(B, C, self.N, self.H)
        out = dense_attention(q, k, v, causal=False, sm_scale=self.H**-0.5)
        return self.out_proj(out.reshape(B, C, self.N * self.H))


class CLIPMLP(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.fc1 = Linear(
            config.hidden_size, config.intermediate_size, bias=True, dtype=dtype, rngs=rngs
        )
        self.fc2 = Linear(
            config.intermediate_size,
            config.hidden_size,
            bias=True,
            dtype=dtype,
            shard=ROW,
            rngs=rngs,
        )
        self.act = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(activation(self.act)(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        eps = config.layer_norm_eps
        self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps, dtype=dtype)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(config, dtype=dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )


class CLIPVisionModel(nnx.Module):
    def __init__(self, config, *, dtype=jnp.float32, rngs):
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(
            config.hidden_size, config.layer_norm_eps, dtype=dtype
        )  # sic (HF)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype)

    def __call__(self, pixel_values: jax.Array, num_states: int | None = None) -> list[jax.Array]:
        """pixel_values (B, C, Hpx, Wpx) -> the first `num_states` hidden states, each (B, C, D)."""
        L = len(self.encoder.layers)
        num_states = L + 1 if num_states is None else num_states
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [x]
        for layer in list(self.encoder.layers)[: num_states - 1]:
            x = layer(x)
            states.append(x)
        return states
