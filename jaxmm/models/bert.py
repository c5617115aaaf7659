"""BERT-style encoders (BertModel, RobertaModel, XLMRobertaModel) for pooling / embeddings.

Embeddings (word + learned absolute position + token type 0) -> LayerNorm -> post-LN layers
of [bidirectional attention over the non-padding tokens -> dense + residual -> LayerNorm,
intermediate dense + GELU -> output dense + residual -> LayerNorm]. `__call__` returns the
last hidden state (HF's `last_hidden_state`); pooling (mean, CLS, ...) is the runner's job.
The HF pooler (dense + tanh over CLS) is not part of sentence embeddings and is not loaded.

RoBERTa / XLM-R differ only in where positions start: HF counts them from
`pad_token_id + 1` (so the table has `max_position_embeddings - pad_token_id - 1` usable
rows); everything else, names included, is BERT's.

Batches are right-padded `(B, C)` arrays with a `(B, C)` mask of real tokens; padded keys
get a large negative score bias, so a padded row never influences a real one.
Shape letters: B sequences, C tokens per sequence, D width, N heads, H head dim, F MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmm.layers.attention import dense_attention
from jaxmm.layers.linear import ROW, Embed, Linear
from jaxmm.layers.mlp import activation
from jaxmm.models.encoders.clip import LayerNorm


class BertEmbeddings(nnx.Module):
    def __init__(self, config, position_offset: int, *, dtype, rngs):
        D = config.hidden_size
        self.word_embeddings = Embed(config.vocab_size, D, dtype=dtype, rngs=rngs)
        self.position_embeddings = Embed(config.max_position_embeddings, D, dtype=dtype, rngs=rngs)
        self.token_type_embeddings = Embed(config.type_vocab_size, D, dtype=dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(D, config.layer_norm_eps, dtype=dtype)
        self.position_offset = position_offset

    def __call__(self, input_ids: jax.Array) -> jax.Array:  # (B, C) -> (B, C, D)
        C = input_ids.shape[1]
        positions = jnp.arange(C) + self.position_offset
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        # single-segment inputs: every token has token type 0
        x = x + self.token_type_embeddings.embedding[0]
        return self.LayerNorm(x)


class BertSelfAttention(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = D // self.num_heads
        self.query = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.key = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.value = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        B, C, D = x.shape
        N, H = self.num_heads, self.head_dim
        q = self.query(x).reshape(B, C, N, H)
        k = self.key(x).reshape(B, C, N, H)
        v = self.value(x).reshape(B, C, N, H)
        out = dense_attention(q, k, v, causal=False, sm_scale=H**-0.5, bias=bias)
        return out.reshape(B, C, D)


class BertSelfOutput(nnx.Module):
    """attention.output: project the heads back, add the residual, LayerNorm (post-LN)."""

    def __init__(self, config, *, dtype, rngs):
        D = config.hidden_size
        self.dense = Linear(D, D, bias=True, dtype=dtype, shard=ROW, rngs=rngs)
        self.LayerNorm = LayerNorm(D, config.layer_norm_eps, dtype=dtype)

    def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.self = BertSelfAttention(config, dtype=dtype, rngs=rngs)  # sic (HF)
        self.output = BertSelfOutput(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        return self.output(self.self(x, bias), x)


class BertIntermediate(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.dense = Linear(
            config.hidden_size, config.intermediate_size, bias=True, dtype=dtype, rngs=rngs
        )
        self.act = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, C, D) -> (B, C, F)
        return activation(self.act)(self.dense(x))


class BertOutput(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D, F = config.hidden_size, config.intermediate_size
        self.dense = Linear(F, D, bias=True, dtype=dtype, shard=ROW, rngs=rngs)
        self.LayerNorm = LayerNorm(D, config.layer_norm_eps, dtype=dtype)

    def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(h) + residual)


class BertLayer(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.attention = BertAttention(config, dtype=dtype, rngs=rngs)
        self.intermediate = BertIntermediate(config, dtype=dtype, rngs=rngs)
        self.output = BertOutput(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class BertEncoder(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        self.layer = nnx.List(
            [BertLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )


class BertModel(nnx.Module):
    # the HF pooler (dense + tanh on CLS) and the position-id buffer are not used; weights of
    # task models (`bert.` / `roberta.` prefixes) load with the prefix dropped
    ignored_hf_keys = (r"^pooler\.", r"position_ids$")
    hf_key_rules = (
        (r"^(bert|roberta)\.", ""),
        (r"LayerNorm\.gamma$", "LayerNorm.weight"),  # TF-era checkpoints
        (r"LayerNorm\.beta$", "LayerNorm.bias"),
    )

    def __init__(self, config, *, dtype=jnp.float32, rngs):
        if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise ValueError(
                f"position_embedding_type={config.position_embedding_type!r} is not supported "
                "(only absolute positions)"
            )
        self.hidden_size = config.hidden_size
        offset = self.position_offset(config)
        self.max_positions = config.max_position_embeddings - offset
        self.embeddings = BertEmbeddings(config, offset, dtype=dtype, rngs=rngs)
        self.encoder = BertEncoder(config, dtype=dtype, rngs=rngs)

    @staticmethod
    def position_offset(config) -> int:
        return 0

    def __call__(self, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
        """input_ids (B, C) int, mask (B, C) bool (real tokens) -> hidden (B, C, D)."""
        # padded keys: a large finite negative (not -inf) so all-padding rows stay finite
        bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]  # (B,1,1,C)
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x


class XLMRobertaModel(BertModel):
    @staticmethod
    def position_offset(config) -> int:
        # HF: positions count from padding_idx + 1 (padding_idx = pad_token_id)
        return (config.pad_token_id if config.pad_token_id is not None else 1) + 1


RobertaModel = XLMRobertaModel
