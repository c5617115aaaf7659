"""Whisper: a convolutional audio encoder and a text decoder that cross-attends to it.

Encoder (once per request): log-mel features (B, mel, 2C) -> conv1 + GELU -> conv2 (stride 2)
+ GELU -> + sinusoidal positions -> pre-LN transformer layers (dense attention) -> LayerNorm
-> (B, C, D). Each decoder layer's cross-attention keys and values depend only on that
output, so they are computed right away (`encode_cross_kv`) and kept for the request's
whole life in a slot of per-layer slabs `(2, slots, N, C, H)`; these slabs are the model's
`extra_caches`, which the runner appends after the paged self-attention caches and donates
with them through every step.

Decoder (every step, in the ordinary ragged paged batch): token + learned position
embeddings -> layers of [pre-LN causal self-attention over the paged KV cache, pre-LN
cross-attention to the sequence's slot, pre-LN GELU MLP] -> LayerNorm -> logits through the
(tied) embeddings. Which slot a sequence reads arrives per step as
`seq_inputs["cross_slot"]: (S,)`; each token finds its sequence from `cu_q_lens`.

The front end (`jaxmm.multimodal.audio_inputs`) owns the slots: it runs
`cross_kv_writer` when a request is first scheduled and frees the slot when it finishes.
Weights load under HF's names (`model.encoder.*`, `model.decoder.*`, `proj_out`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.attention import AttentionMetadata, dense_attention, paged_attention
from jaxmm.layers.linear import ROW, Embed, Linear
from jaxmm.layers.mlp import activation
from jaxmm.models.encoders.clip import LayerNorm

# how decoder tokens read their cross-attention slot: "loop" (a token at a time, in place),
# "gather" (chunks of tokens, a copied slab each) or "auto" (loop on CPU, else gather);
# read when a step is traced
CROSS_ATTENTION = "auto"
# the gather path copies one (N, C, H) slab per token, in chunks of this many tokens so a
# long prefill never materialises T slabs at once. H100, tiny.en shapes, 64 tokens for 64
# requests: gather 11.7k tok/s, loop 6.7k; on 2 CPU cores loop is ~7x faster than gather
CROSS_CHUNK = 64
# ceiling on the bytes of cross-attention slabs (all layers, all slots); fewer slots than
# max_num_seqs are made when it binds, and the front end caps concurrent requests to them
CROSS_CACHE_BYTES = {"cpu": 1 << 30}
DEFAULT_CROSS_CACHE_BYTES = 8 << 30


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class Conv1d(nnx.Module):
    """torch.nn.Conv1d with HF names: `weight` (out, in, kernel), `bias` (out,)."""

    def __init__(self, din: int, dout: int, kernel: int, stride: int, *, dtype):
        self.weight = nnx.Param(jnp.zeros((dout, din, kernel), dtype=dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), dtype=dtype))
        self.stride = stride
        self.padding = kernel // 2

    def __call__(self, x: jax.Array) -> jax.Array:  # x: (B, in, len) -> (B, out, len/stride)
        w = self.weight[...]
        y = jax.lax.conv_general_dilated(
            x.astype(w.dtype),
            w,
            window_strides=(self.stride,),
            padding=[(self.padding, self.padding)],
            dimension_numbers=("NCH", "OIH", "NCH"),
        )
        return y + self.bias[...][None, :, None]


class WhisperAttention(nnx.Module):
    """q/k/v/out projections under HF's names; k_proj has no bias (a key bias only shifts
    every logit of a query row equally)."""

    def __init__(self, D: int, N: int, *, dtype, rngs):
        self.N, self.H = N, D // N
        self.q_proj = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(D, D, bias=False, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(D, D, bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(D, D, bias=True, dtype=dtype, shard=ROW, rngs=rngs)
        self.scale = self.H**-0.5

    def heads(self, x: jax.Array) -> jax.Array:  # (..., D) -> (..., N, H)
        return x.reshape(*x.shape[:-1], self.N, self.H)

    def kv(self, x: jax.Array) -> jax.Array:
        """x (..., D) -> stacked keys and values (2, ..., N, H)."""
        return jnp.stack([self.heads(self.k_proj(x)), self.heads(self.v_proj(x))])

    def dense(self, x: jax.Array, bias=None) -> jax.Array:
        """Encoder self-attention, x: (B, C, D); bias (B, 1, 1, C) masks padded frames."""
        q = self.heads(self.q_proj(x))
        k, v = self.kv(x)
        out = dense_attention(q, k, v, causal=False, sm_scale=self.scale, bias=bias)
        return self.out_proj(out.reshape(*x.shape))

    def paged(self, x, kv_pages, md: AttentionMetadata, backend: str):
        """Decoder self-attention over the paged cache, x: (T, D)."""
        q = self.heads(self.q_proj(x))  # (T, N, H)
        k, v = self.kv(x)
        out, kv_pages = paged_attention(q, k, v, kv_pages, md, sm_scale=self.scale, backend=backend)
        return self.out_proj(out.reshape(x.shape)), kv_pages

    def cross(self, x: jax.Array, slabs: jax.Array, token_slot, num_tokens) -> jax.Array:
        """Cross-attention of x (T, D) to each token's slot in slabs (2, slots, N, C, H)."""
        T, D = x.shape
        q = self.heads(self.q_proj(x)).astype(jnp.float32) * self.scale  # (T, N, H)
        impl = CROSS_ATTENTION
        if impl == "auto":
            impl = "loop" if jax.default_backend() == "cpu" else "gather"
        if impl == "loop":
            out = cross_attention_loop(q, slabs, token_slot, num_tokens)
        else:
            out = cross_attention_gather(q, slabs, token_slot)
        return self.out_proj(out.reshape(T, D).astype(x.dtype))


def _attend(q, k, v):
    """q (..., N, H) f32, k/v (..., N, C, H) -> (..., N, H)."""
    scores = jnp.einsum("...NH,...NCH->...NC", q, k.astype(jnp.float32))
    return jnp.einsum("...NC,...NCH->...NH", jax.nn.softmax(scores, axis=-1), v.astype(jnp.float32))


def cross_attention_loop(q, slabs, token_slot, num_tokens):
    """One token at a time, reading its slot in place; padding tokens are skipped.

    On CPU this is ~7x faster than gathering a slab per token (tiny.en, T=16: 7 ms vs 50
    ms a layer): no copies, and a decode step's padding costs nothing.
    """

    def one(args):
        t, qt, slot = args

        def attend(_):
            k = jax.lax.dynamic_index_in_dim(slabs[0], slot, 0, keepdims=False)
            v = jax.lax.dynamic_index_in_dim(slabs[1], slot, 0, keepdims=False)
            return _attend(qt, k, v)

        return jax.lax.cond(t < num_tokens, attend, lambda _: jnp.zeros_like(qt), None)

    T = q.shape[0]
    return jax.lax.map(one, (jnp.arange(T), q, token_slot))


def cross_attention_gather(q, slabs, token_slot):
    """Tokens in chunks of CROSS_CHUNK, each gathering its slab: parallel, for accelerators."""
    T = q.shape[0]
    chunk = min(T, CROSS_CHUNK)

    def attend(args):
        qc, slot = args  # (B, N, H), (B,)
        return _attend(qc, slabs[0][slot], slabs[1][slot])

    out = jax.lax.map(
        attend, (q.reshape(T // chunk, chunk, *q.shape[1:]), token_slot.reshape(-1, chunk))
    )
    return out.reshape(q.shape)


class WhisperMLP(nnx.Module):
    def __init__(self, D: int, F: int, act: str, *, dtype, rngs):
        self.fc1 = Linear(D, F, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(F, D, bias=True, dtype=dtype, shard=ROW, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(activation(self.act)(self.fc1(x)))


# ---------------------------------------------------------------------------------------
# Encoder


class WhisperEncoderLayer(nnx.Module):
    def __init__(self, config, *, dtype, rngs):
        D = config.d_model
        self.self_attn = WhisperAttention(D, config.encoder_attention_heads, dtype=dtype, rngs=rngs)
        self.self_attn_layer_norm = LayerNorm(D, dtype=dtype)
        self.fc1 = Linear(D, config.encoder_ffn_dim, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(config.encoder_ffn_dim, D, bias=True, dtype=dtype, shard=ROW, rngs=rngs)
        self.final_layer_norm = LayerNorm(D, dtype=dtype)
        self.act = config.activation_function

    def __call__(self, x: jax.Array, bias=None) -> jax.Array:  # x: (B, C, D)
        x = x + self.self_attn.dense(self.self_attn_layer_norm(x), bias)
        return x + self.fc2(activation(self.act)(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nnx.Module):
    """Whisper's audio tower; Qwen2-Audio's is the same plus pooling (see qwen2_audio.py)."""

    def __init__(self, config, *, dtype, rngs):
        D = config.d_model
        self.conv1 = Conv1d(config.num_mel_bins, D, 3, 1, dtype=dtype)
        self.conv2 = Conv1d(D, D, 3, 2, dtype=dtype)
        # sinusoids in every released checkpoint; a weight here, as in HF
        self.embed_positions = Embed(config.max_source_positions, D, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                WhisperEncoderLayer(config, dtype=dtype, rngs=rngs)
                for _ in range(config.encoder_layers)
            ]
        )
        self.layer_norm = LayerNorm(D, dtype=dtype)
        self.num_frames = 2 * config.max_source_positions  # mel frames the encoder takes

    def embed_features(self, features: jax.Array) -> jax.Array:
        """features (B, mel, 2C) -> conv stem + positions (B, C, D)."""
        gelu = activation("gelu")
        x = gelu(self.conv2(gelu(self.conv1(features))))  # (B, D, C)
        x = x.transpose(0, 2, 1)
        return x + self.embed_positions.embedding[...][None, : x.shape[1]]

    def __call__(self, features: jax.Array) -> jax.Array:
        x = self.embed_features(features)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


# ---------------------------------------------------------------------------------------
# Decoder


class WhisperDecoderLayer(nnx.Module):
    def __init__(self, config, *, dtype, attention_backend: str, rngs):
        D, N = config.d_model, config.decoder_attention_heads
        self.self_attn = WhisperAttention(D, N, dtype=dtype, rngs=rngs)
        self.self_attn_layer_norm = LayerNorm(D, dtype=dtype)
        self.encoder_attn = WhisperAttention(D, N, dtype=dtype, rngs=rngs)
        self.encoder_attn_layer_norm = LayerNorm(D, dtype=dtype)
        self.fc1 = Linear(D, config.decoder_ffn_dim, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(config.decoder_ffn_dim, D, bias=True, dtype=dtype, shard=ROW, rngs=rngs)
        self.final_layer_norm = LayerNorm(D, dtype=dtype)
        self.act = config.activation_function
        self.backend = attention_backend

    def __call__(self, x, kv_pages, slabs, token_slot, num_tokens, md: AttentionMetadata):
        h, kv_pages = self.self_attn.paged(self.self_attn_layer_norm(x), kv_pages, md, self.backend)
        x = x + h
        x = x + self.encoder_attn.cross(
            self.encoder_attn_layer_norm(x), slabs, token_slot, num_tokens
        )
        x = x + self.fc2(activation(self.act)(self.fc1(self.final_layer_norm(x))))
        return x, kv_pages


class WhisperDecoder(nnx.Module):
    def __init__(self, config, *, dtype, attention_backend: str, rngs):
        D = config.d_model
        self.embed_tokens = Embed(config.vocab_size, D, dtype=dtype, rngs=rngs)
        self.embed_positions = Embed(config.max_target_positions, D, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                WhisperDecoderLayer(
                    config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
                )
                for _ in range(config.decoder_layers)
            ]
        )
        self.layer_norm = LayerNorm(D, dtype=dtype)


class WhisperModel(nnx.Module):
    def __init__(self, config, *, dtype, attention_backend: str, rngs):
        self.encoder = WhisperEncoder(config, dtype=dtype, rngs=rngs)
        self.decoder = WhisperDecoder(
            config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )


def token_rows(cu_q_lens: jax.Array, T: int) -> jax.Array:
    """(T,) index of the sequence each token of the flat ragged batch belongs to."""
    S = cu_q_lens.shape[0] - 1
    rows = jnp.searchsorted(cu_q_lens[1:], jnp.arange(T, dtype=cu_q_lens.dtype), side="right")
    return jnp.minimum(rows, S - 1)  # padding tokens: any valid row


class WhisperForConditionalGeneration(nnx.Module):
    is_multimodal = True
    is_encoder_decoder = True
    mm_modalities = ("audio",)
    uses_mrope = False

    def __init__(self, config, *, dtype=jnp.float32, attention_backend: str = "reference", rngs):
        self.config = config
        if getattr(config, "max_position_embeddings", None) is None:
            # the runner sizes max_model_len from max_position_embeddings; Whisper's decoder
            # has max_target_positions learned positions and nothing past them
            config.max_position_embeddings = config.max_target_positions
        self.model = WhisperModel(
            config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        if self.tie_word_embeddings:
            self.ignored_hf_keys = (r"^proj_out\.weight$",)
        else:
            self.ignored_hf_keys = ()
            self.proj_out = Linear(config.d_model, config.vocab_size, dtype=dtype, rngs=rngs)
        self.num_frames = self.model.encoder.num_frames

    # -- the decoder step (what the runner's step calls) -------------------------------------
    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.model.decoder.embed_tokens(input_ids)

    def __call__(
        self, input_ids, kv_caches, md: AttentionMetadata, inputs_embeds=None, seq_inputs=None
    ):
        dec = self.model.decoder
        L = len(dec.layers)
        T, S = input_ids.shape[0], md.kv_lens.shape[0]
        x = dec.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (T, D)
        positions = jnp.minimum(md.positions, dec.embed_positions.num_embeddings - 1)
        x = x + dec.embed_positions(positions).astype(x.dtype)
        if seq_inputs is not None and "cross_slot" in seq_inputs:
            slots = jnp.asarray(seq_inputs["cross_slot"], jnp.int32).reshape(S)
        else:  # warmup: no request holds a slot; slot 0 is read and the result unused
            slots = jnp.zeros((S,), jnp.int32)
        token_slot = slots[token_rows(md.cu_q_lens, T)]
        num_tokens = md.cu_q_lens[md.num_seqs[0]]  # the rest is bucket padding
        self_caches, cross = list(kv_caches[:L]), list(kv_caches[L:])
        for i, layer in enumerate(dec.layers):
            x, self_caches[i] = layer(x, self_caches[i], cross[i], token_slot, num_tokens, md)
        return dec.layer_norm(x), self_caches + cross

    def default_seq_inputs(self, S: int) -> dict:
        """Per-sequence inputs of a step no request fills (warmup): every row reads slot 0.
        A runner that passes these when no step has any keeps one program per bucket."""
        return {"cross_slot": np.zeros((S,), np.int32)}

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden (S, D) -> logits (S, V) in float32."""
        if self.tie_word_embeddings:
            logits = self.model.decoder.embed_tokens.attend(hidden)
        else:
            logits = self.proj_out(hidden)
        return logits.astype(jnp.float32)

    def kv_cache_spec(self) -> tuple[int, int, int]:
        c = self.config
        return c.decoder_layers, c.decoder_attention_heads, c.d_model // c.decoder_attention_heads

    # -- cross-attention slots ---------------------------------------------------------------
    def cross_slab_shape(self, slots: int) -> tuple[int, ...]:
        c = self.config
        N = c.decoder_attention_heads
        return (2, slots, N, c.max_source_positions, c.d_model // N)

    def num_cross_slots(self, dtype, max_num_seqs: int) -> int:
        per_slot = (
            self.config.decoder_layers
            * int(np.prod(self.cross_slab_shape(1)))
            * jnp.dtype(dtype).itemsize
        )
        budget = CROSS_CACHE_BYTES.get(jax.default_backend(), DEFAULT_CROSS_CACHE_BYTES)
        return int(max(1, min(max_num_seqs, budget // per_slot)))

    def extra_caches(self, dtype, max_num_seqs: int) -> list[jax.Array]:
        """One cross-attention K/V slab per decoder layer: (2, slots, N, C, H)."""
        shape = self.cross_slab_shape(self.num_cross_slots(dtype, max_num_seqs))
        return [jnp.zeros(shape, dtype) for _ in range(self.config.decoder_layers)]

    def encode_cross_kv(self, features: jax.Array) -> list[jax.Array]:
        """features (B, mel, 2C) -> per decoder layer, keys and values (2, B, N, C, H)."""
        enc = self.model.encoder(features)
        return [
            layer.encoder_attn.kv(enc).transpose(0, 1, 3, 2, 4)
            for layer in self.model.decoder.layers
        ]

    def cross_kv_writer(self, graphdef):
        """A host function (params, slabs, features (B, mel, 2C), slots) -> new slabs.

        Encodes the audio of B requests and stores each one's cross-attention K/V in its
        slot. The slabs are donated (updated in place). Batches are padded to a power of two
        (one program each); padding rows write nowhere.
        """

        @jax.jit
        def encode(params, features):
            return nnx.merge(graphdef, params).encode_cross_kv(features)

        def store(slabs, kvs, slots):
            return [
                s.at[:, slots].set(kv.astype(s.dtype), mode="drop") for s, kv in zip(slabs, kvs)
            ]

        store = jax.jit(store, donate_argnums=(0,))

        def write(params, slabs: list, features: np.ndarray, slots: list[int]) -> list:
            B = next_pow2(len(slots))
            padded = np.zeros((B, *features.shape[1:]), np.float32)
            padded[: len(slots)] = features
            where = np.full(B, slabs[0].shape[1], np.int32)  # out of range: dropped
            where[: len(slots)] = slots
            return store(slabs, encode(params, padded), where)

        return write
