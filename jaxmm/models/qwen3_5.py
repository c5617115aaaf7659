"""Qwen3.5 (text): a hybrid of Gated DeltaNet linear attention and gated full attention.

`layer_types` (e.g. three "linear_attention" layers for every "full_attention" one) picks
each decoder layer's token mixer:
- full attention: Qwen3's attention (q/k RMSNorm per head) whose q_proj also yields a
  per-head output gate (`out * sigmoid(gate)`), with the rotary on the first
  `partial_rotary_factor` of each head; it keeps paged KV like every model here.
- linear attention: `jaxmm.layers.linear_attention.GatedDeltaNet`, whose conv and
  recurrent states live in per-sequence slots (`jaxmm.engine.state_cache`).
Norms are zero-centred RMSNorms (`(1 + w) * x`). Qwen3.5's rotary is Qwen3-VL's
interleaved M-RoPE over the rotated part of each head: (3, T) positions with images, and
text-only positions (T,) make it the plain rotary.

`Qwen3_5ForConditionalGeneration` is Qwen3-VL's multimodal contract, vision tower and
weight layout (`qwen3_vl.py`) around this decoder; Qwen3.5's tower has no DeepStack levels.

Caches: `kv_cache_spec()` counts the full-attention layers only; `state_cache_spec()` gives
one conv and one recurrent state per linear layer. The runner passes the KV pages first,
then the state arrays `(slots + 1, ...)` in layer order, and each step row's slot in
`seq_inputs["state_slot"]` (S,).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.attention import AttentionMetadata, paged_attention
from jaxmm.layers.linear import ROW, Embed, Linear
from jaxmm.layers.linear_attention import GatedDeltaNet
from jaxmm.layers.mlp import GatedMLP
from jaxmm.layers.norm import RMSNorm
from jaxmm.layers.rope import apply_rotary, cos_sin, inv_frequencies, rope_parameters
from jaxmm.models.llama import head_dim
from jaxmm.models.qwen3_vl import Qwen3VLForConditionalGeneration, interleaved_mrope_rows


def _norm(dim: int, config, dtype) -> RMSNorm:
    return RMSNorm(dim, config.rms_norm_eps, dtype=dtype, offset=1.0)


def rotary_dim(config) -> int:
    factor = rope_parameters(config).get("partial_rotary_factor", 1.0)
    return int(head_dim(config) * factor)


class Qwen3_5Attention(nnx.Module):
    def __init__(self, config, *, dtype, attention_backend: str, rngs):
        D = config.hidden_size
        self.N = config.num_attention_heads
        self.K = config.num_key_value_heads
        self.H = head_dim(config)
        self.R = rotary_dim(config)
        bias = bool(getattr(config, "attention_bias", False))
        # q_proj: per head, H query features then H gate features
        self.q_proj = Linear(D, self.N * self.H * 2, bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(D, self.K * self.H, bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(D, self.K * self.H, bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(self.N * self.H, D, bias=bias, dtype=dtype, shard=ROW, rngs=rngs)
        self.q_norm = _norm(self.H, config, dtype)
        self.k_norm = _norm(self.H, config, dtype)
        self.scale = self.H**-0.5
        self.backend = attention_backend

    def _rotate(self, x, cos, sin):
        if self.R == self.H:
            return apply_rotary(x, cos, sin)
        return jnp.concatenate([apply_rotary(x[..., : self.R], cos, sin), x[..., self.R :]], -1)

    def __call__(self, x, cos, sin, kv_pages, md: AttentionMetadata):
        T = x.shape[0]
        qg = self.q_proj(x).reshape(T, self.N, 2 * self.H)
        q, gate = qg[..., : self.H], qg[..., self.H :]  # (T, N, H) each
        k = self.k_proj(x).reshape(T, self.K, self.H)
        v = self.v_proj(x).reshape(T, self.K, self.H)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        out, kv_pages = paged_attention(
            q, k, v, kv_pages, md, sm_scale=self.scale, backend=self.backend
        )
        out = out * jax.nn.sigmoid(gate)
        return self.o_proj(out.reshape(T, self.N * self.H)), kv_pages


class Qwen3_5DecoderLayer(nnx.Module):
    def __init__(self, config, layer_idx: int, *, dtype, attention_backend: str, rngs):
        self.is_linear = config.layer_types[layer_idx] == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config, dtype=dtype, rngs=rngs)
        else:
            self.self_attn = Qwen3_5Attention(
                config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
            )
        self.mlp = self.make_mlp(config, dtype=dtype, rngs=rngs)
        self.input_layernorm = _norm(config.hidden_size, config, dtype)
        self.post_attention_layernorm = _norm(config.hidden_size, config, dtype)

    def __call__(self, x, cos, sin, caches: tuple, md, state_md):
        h = self.input_layernorm(x)
        if self.is_linear:
            h, *caches = self.linear_attn(h, *caches, *state_md)
        else:
            h, kv_pages = self.self_attn(h, cos, sin, caches[0], md)
            caches = [kv_pages]
        x = x + h
        x = x + self.feed_forward(self.post_attention_layernorm(x), md)
        return x, tuple(caches)

    # feed-forward hooks: Qwen3.5-MoE (qwen3_5_moe.py) puts its MoE block here
    def make_mlp(self, config, *, dtype, rngs) -> nnx.Module:
        D, F = config.hidden_size, config.intermediate_size
        return GatedMLP(D, F, config.hidden_act, dtype=dtype, rngs=rngs)

    def feed_forward(self, h: jax.Array, md: AttentionMetadata) -> jax.Array:
        del md
        return self.mlp(h)


class Qwen3_5TextModel(nnx.Module):
    layer_cls = Qwen3_5DecoderLayer

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
        self.norm = _norm(config.hidden_size, config, dtype)
        params = rope_parameters(config)
        self.inv_freq = tuple(
            float(f)
            for f in inv_frequencies(head_dim(config), params, rotary_dim=rotary_dim(config))
        )
        section = params.get("mrope_section")
        self.mrope_rows = interleaved_mrope_rows(len(self.inv_freq), section) if section else None

    def rotary(self, positions):
        """positions (T,) or (3, T) (t, h, w) -> cos, sin (T, R) for the rotated dims R."""
        inv = jnp.asarray(np.array(self.inv_freq, np.float32))
        if positions.ndim == 1 or self.mrope_rows is None:
            return cos_sin(positions if positions.ndim == 1 else positions[0], inv)
        freqs = positions.astype(jnp.float32)[:, :, None] * inv  # (3, T, R/2)
        cols = np.arange(len(self.mrope_rows))
        freqs = freqs[np.array(self.mrope_rows), :, cols].T  # (T, R/2): a row per frequency
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)

    def __call__(self, input_ids, caches, md: AttentionMetadata, slots, inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (T, D)
        cos, sin = self.rotary(md.positions)
        q_lens = md.cu_q_lens[1:] - md.cu_q_lens[:-1]
        has_state = md.kv_lens - q_lens > 0  # the row continues an earlier chunk's state
        state_md = (slots, md.cu_q_lens, has_state)
        n_full = sum(not layer.is_linear for layer in self.layers)
        kv, states = list(caches[:n_full]), list(caches[n_full:])
        ki = si = 0
        for layer in self.layers:
            if layer.is_linear:
                x, (states[si], states[si + 1]) = layer(
                    x, cos, sin, (states[si], states[si + 1]), md, state_md
                )
                si += 2
            else:
                x, (kv[ki],) = layer(x, cos, sin, (kv[ki],), md, state_md)
                ki += 1
        return self.norm(x), kv + states


def _slots(kv_caches, md: AttentionMetadata, seq_inputs) -> jax.Array:
    """(S,) each step row's state slot (the runner's `seq_inputs["state_slot"]`)."""
    if seq_inputs is not None and "state_slot" in seq_inputs:
        return seq_inputs["state_slot"]
    # no request in the step: every row uses the scratch slot
    return jnp.full(md.kv_lens.shape, kv_caches[-1].shape[0] - 1, jnp.int32)


class Qwen3_5ForCausalLM(nnx.Module):
    model_cls = Qwen3_5TextModel

    def __init__(self, config, *, dtype=jnp.float32, attention_backend: str = "reference", rngs):
        self.config = config
        self.model = self.model_cls(
            config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs)

    # weights: multi-token-prediction heads and a vision tower are not used by the text model
    ignored_hf_keys = (r"^mtp\.", r"^model\.visual\.", r"rotary_emb\.inv_freq")

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.model.embed_tokens(input_ids)

    def __call__(
        self, input_ids, kv_caches, md: AttentionMetadata, inputs_embeds=None, seq_inputs=None
    ):
        return self.model(
            input_ids, kv_caches, md, _slots(kv_caches, md, seq_inputs), inputs_embeds
        )

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden (S, D) -> logits (S, V) in float32."""
        if self.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)

    def kv_cache_spec(self) -> tuple[int, int, int]:
        """(full-attention layers L, kv heads K, head dim H) of the paged cache."""
        c = self.config
        n_full = sum(t == "full_attention" for t in c.layer_types)
        return n_full, c.num_key_value_heads, head_dim(c)

    def state_cache_spec(self, dtype) -> list[tuple[tuple[int, ...], jnp.dtype]]:
        """Per-slot (shape, dtype) of each state array, in the order the model reads them."""
        spec = []
        for layer in self.model.layers:
            if layer.is_linear:
                spec += layer.linear_attn.state_shapes(dtype)
        return spec


class Qwen3_5ForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Images and video through Qwen3-VL's front end and tower; text through the hybrid."""

    model_cls = Qwen3_5TextModel
    ignored_hf_keys = (r"^mtp\.", r"rotary_emb\.inv_freq")

    def __init__(self, config, **kwargs):
        config = copy.copy(config)
        vision = copy.copy(config.vision_config)
        vision.deepstack_visual_indexes = []  # the tower returns its merger's rows only
        config.vision_config = vision
        super().__init__(config, **kwargs)

    def __call__(
        self,
        input_ids,
        kv_caches,
        md: AttentionMetadata,
        inputs_embeds=None,
        seq_inputs=None,
        mm_extra=None,
    ):
        del mm_extra  # no DeepStack levels
        return self.model(
            input_ids, kv_caches, md, _slots(kv_caches, md, seq_inputs), inputs_embeds
        )

    kv_cache_spec = Qwen3_5ForCausalLM.kv_cache_spec
    state_cache_spec = Qwen3_5ForCausalLM.state_cache_spec
