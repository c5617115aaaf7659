"""SigLIP vision tower (Gemma 3's and LLaVA-OneVision's image encoder), HF names.

Embeddings (patch conv with bias as a matmul + learned positions, no CLS token) ->
EncoderLayer x L -> post_layernorm. Two entry points:

- `__call__(pixel_values, num_states)` returns HF's `hidden_states` (index 0: the
  embeddings, index i: the output of layer i, none of them post-normed), for models that
  pick a feature layer (LLaVA-OneVision's `vision_feature_layer`); layers past the deepest
  one asked for are not run.
- `last_hidden_state(pixel_values)` is HF's `last_hidden_state`: every layer, then
  `post_layernorm` (Gemma 3's projector input).

The attention pooling head (`vision_use_head`) feeds neither model: its weights are
dropped on load (`ignored_hf_keys`). Position interpolation for other image sizes is not
supported: pixel values must be `image_size` square. Shape letters: B images,
C patches per image, D width, N heads, H head dim.

Weights: transformers 5 names the tower's tensors `embeddings.*`, `encoder.*`,
`post_layernorm.*` under the owner's prefix; older checkpoints (and the hub's Gemma 3 ones)
put `vision_model.` in between. `hf_key_rules(prefix)` folds that spelling onto this tree
for a tower held at `prefix` (e.g. "vision_tower"); `ignored_hf_keys(prefix)` drops the
pooling head.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmm.layers.linear import ROW, Embed, Linear
from jaxmm.models.encoders.clip import CLIPMLP as SiglipMLP
from jaxmm.models.encoders.clip import LayerNorm
from jaxmm.models.encoders.qwen2_vl_vision import _xla_attention, attention_implementation


def hf_key_rules(prefix: str) -> tuple[tuple[str, str], ...]:
    """Loader rules for a tower at `prefix`: `{prefix}.vision_model.*` -> `{prefix}.*`."""
    p = re.escape(prefix)
    return ((rf"^{p}\.vision_model\.", f"{prefix}."),)


def ignored_hf_keys(prefix: str) -> tuple[str, ...]:
    """HF keys of a tower at `prefix` that carry no parameter here (the pooling head)."""
    p = re.escape(prefix)
    return (rf"^{p}\.(vision_model\.)?head\.", rf"^{p}\..*position_ids$")


class PatchConv(nnx.Module):
    """A stride == kernel Conv2d under HF's names (`weight` (D, C, p, p) and `bias` (D,))."""

    def __init__(self, D: int, C: int, p: int, dtype):
        self.weight = nnx.Param(jnp.zeros((D, C, p, p), dtype=dtype))
        self.bias = nnx.Param(jnp.zeros((D,), dtype=dtype))


class SiglipVisionEmbeddings(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D, C, p = config.hidden_size, config.num_channels, config.patch_size
        self.patch_size = p
        self.patch_embedding = PatchConv(D, C, p, dtype)
        num_positions = (config.image_size // p) ** 2
        self.position_embedding = Embed(num_positions, D, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values (B, C, Hpx, Wpx) -> (B, P, D), patches in row-major order."""
        B, Cin, Hpx, Wpx = pixel_values.shape
        p = self.patch_size
        x = pixel_values.reshape(B, Cin, Hpx // p, p, Wpx // p, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(B, (Hpx // p) * (Wpx // p), Cin * p * p)
        w = self.patch_embedding.weight[...]
        patches = jnp.einsum("BPK,DK->BPD", x.astype(w.dtype), w.reshape(w.shape[0], -1))
        patches = patches + self.patch_embedding.bias[...]
        return patches + self.position_embedding.embedding[...][None, : patches.shape[1]]


class SiglipAttention(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D = config.hidden_size
        self.N = config.num_attention_heads
        self.H = D // self.N
        self.q_proj = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(D, D, bias=True, dtype=dtype, shard=ROW, rngs=rngs)
        # cuDNN flash attention on a GPU in bf16/fp16 (probed once), XLA otherwise
        self.implementation = attention_implementation(dtype, self.H)

    def __call__(self, x: jax.Array) -> jax.Array:  # x: (B, C, D)
        B, C, _ = x.shape
        q = self.q_proj(x).reshape(B, C, self.N, self.H)
        k = self.k_proj(x).reshape(B, C, self.N, self.H)
        v = self.v_proj(x).reshape(B, C, self.N, self.H)
        scale = self.H**-0.5
        if self.implementation == "cudnn":
            out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        else:
            lens = jnp.full((B,), C, jnp.int32)
            out = _xla_attention(q, k, v, lens, scale)  # query blocks: bounded score memory
        return self.out_proj(out.reshape(B, C, self.N * self.H))


class SiglipEncoderLayer(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        eps = config.layer_norm_eps
        self.layer_norm1 = LayerNorm(config.hidden_size, eps, dtype=dtype)
        self.self_attn = SiglipAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps, dtype=dtype)
        self.mlp = SiglipMLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.layers = nnx.List(
            [
                SiglipEncoderLayer(config, dtype=dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )


class SiglipVisionModel(nnx.Module):
    def __init__(self, config, *, dtype=jnp.float32, rngs):
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = SiglipEncoder(config, dtype=dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype)

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    def __call__(self, pixel_values: jax.Array, num_states: int | None = None) -> list[jax.Array]:
        """pixel_values (B, C, Hpx, Wpx) -> the first `num_states` hidden states, each
        (B, P, D), not post-normed (HF's `hidden_states`)."""
        L = len(self.encoder.layers)
        num_states = L + 1 if num_states is None else num_states
        x = self.embeddings(pixel_values)
        states = [x]
        for layer in list(self.encoder.layers)[: num_states - 1]:
            x = layer(x)
            states.append(x)
        return states

    def last_hidden_state(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values (B, C, Hpx, Wpx) -> (B, P, D): all layers, then post_layernorm."""
        return self.post_layernorm(self(pixel_values)[-1])
