"""Llama (and the decoder shared by Qwen2, Qwen3, Mistral): HF names, paged attention.

Attention -> MLP -> DecoderLayer -> Model -> ForCausalLM, read top to bottom.
Variants are switches on the same blocks: qkv bias (Qwen2), q/k RMSNorm (Qwen3),
sliding window (Mistral, Qwen2 with use_sliding_window), tied embeddings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.attention import AttentionMetadata, paged_attention
from jaxmm.layers.linear import ROW, Embed, Linear
from jaxmm.layers.mlp import GatedMLP
from jaxmm.layers.norm import RMSNorm
from jaxmm.layers.rope import apply_rotary, cos_sin, inv_frequencies, rope_parameters


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_sliding_window(config, layer_idx: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


class LlamaAttention(nnx.Module):
    qkv_bias_default = False
    qk_norm = False

    def __init__(self, config, layer_idx: int, *, dtype, attention_backend: str, rngs):
        D = config.hidden_size
        self.N = config.num_attention_heads
        self.K = config.num_key_value_heads
        self.H = head_dim(config)
        bias = getattr(config, "attention_bias", self.qkv_bias_default)
        self.q_proj = Linear(D, self.N * self.H, bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(D, self.K * self.H, bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(D, self.K * self.H, bias=bias, dtype=dtype, rngs=rngs)
        o_bias = bias and not self.qkv_bias_default  # Qwen2: bias on q/k/v only
        self.o_proj = Linear(self.N * self.H, D, bias=o_bias, dtype=dtype, shard=ROW, rngs=rngs)
        if self.qk_norm:
            self.q_norm = RMSNorm(self.H, config.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(self.H, config.rms_norm_eps, dtype=dtype)
        self.sliding_window = layer_sliding_window(config, layer_idx)
        self.scale = self.H**-0.5
        self.backend = attention_backend

    def __call__(self, x, cos, sin, kv_pages, md: AttentionMetadata):
        T = x.shape[0]
        q = self.q_proj(x).reshape(T, self.N, self.H)  # (T, N, H)
        k = self.k_proj(x).reshape(T, self.K, self.H)  # (T, K, H)
        v = self.v_proj(x).reshape(T, self.K, self.H)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out, kv_pages = paged_attention(
            q,
            k,
            v,
            kv_pages,
            md,
            sm_scale=self.scale,
            backend=self.backend,
            sliding_window=self.sliding_window,
        )
        return self.o_proj(out.reshape(T, self.N * self.H)), kv_pages


class LlamaDecoderLayer(nnx.Module):
    attention_cls = LlamaAttention

    def __init__(self, config, layer_idx: int, *, dtype, attention_backend: str, rngs):
        self.self_attn = self.attention_cls(
            config, layer_idx, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        self.mlp = GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            config.hidden_act,
            bias=getattr(config, "mlp_bias", False),
            dtype=dtype,
            rngs=rngs,
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype
        )

    def __call__(self, x, cos, sin, kv_pages, md):
        h, kv_pages = self.self_attn(self.input_layernorm(x), cos, sin, kv_pages, md)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_pages


class LlamaModel(nnx.Module):
    layer_cls = LlamaDecoderLayer

    def __init__(self, config, *, dtype, attention_backend: str, rngs):
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                self.layer_cls(
                    config, i, dtype=dtype, attention_backend=attention_backend, rngs=rngs
                )
                for i in range(config.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.inv_freq = tuple(
            float(f) for f in inv_frequencies(head_dim(config), rope_parameters(config))
        )

    def rotary(self, positions):
        return cos_sin(positions, jnp.asarray(np.array(self.inv_freq, np.float32)))

    def __call__(self, input_ids, kv_caches, md: AttentionMetadata, inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (T, D)
        cos, sin = self.rotary(md.positions)
        new_caches = []
        for layer, kv_pages in zip(self.layers, kv_caches):
            x, kv_pages = layer(x, cos, sin, kv_pages, md)
            new_caches.append(kv_pages)
        return self.norm(x), new_caches


class LlamaForCausalLM(nnx.Module):
    model_cls = LlamaModel

    def __init__(self, config, *, dtype=jnp.float32, attention_backend: str = "reference", rngs):
        self.config = config
        self.model = self.model_cls(
            config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs)

    # weights: HF keys that carry no parameter here
    ignored_hf_keys = (r"rotary_emb\.inv_freq",)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.model.embed_tokens(input_ids)

    def __call__(self, input_ids, kv_caches, md: AttentionMetadata, inputs_embeds=None):
        return self.model(input_ids, kv_caches, md, inputs_embeds)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden (S, D) -> logits (S, V) in float32."""
        if self.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)

    def kv_cache_spec(self) -> tuple[int, int, int]:
        """(layers L, kv heads K, head dim H) of the paged cache."""
        c = self.config
        return c.num_hidden_layers, c.num_key_value_heads, head_dim(c)
