"""Gemma 4: text (`Gemma4ForCausalLM`) and vision (`Gemma4ForConditionalGeneration`), HF names.

Attention -> DecoderLayer -> TextModel -> ForCausalLM, then the VLM. What Gemma 4 adds to
Gemma 3 (`gemma3.py`, whose mask and attention helpers this file reuses):
- per-layer attention shapes: "full_attention" layers have their own head size
  (`global_head_dim`) and, with `attention_k_eq_v`, their own KV head count
  (`num_global_key_value_heads`) and no v_proj (values are the keys' projection, before
  k_norm and RoPE); the runner gives each cached layer a page pool of its own shape
  (`kv_cache_layer_shapes`), so nothing is padded;
- RoPE per kind: local layers the default RoPE, global layers "proportional" RoPE (only
  `partial_rotary_factor` of the frequencies turn, the rest are zero: cos 1, sin 0);
- q/k RMSNorm with a scale, v RMSNorm without one, attention scale 1 (the norms set it);
- Gemma 4 RMSNorm scales by w (not Gemma 3's 1 + w), in float32;
- per-layer inputs (PLE): a second embedding table (`embed_tokens_per_layer`, L x Dp wide)
  plus a projection of the input embeddings (`per_layer_model_projection`), combined once
  per step; each layer gates its slice into the residual after the MLP;
- KV sharing: the last `num_kv_shared_layers` layers compute no K/V: each reads the pages
  of the last earlier layer of its kind (the producer). They own no pages; the kernels write
  before they read, so a shared layer hands them the producer's K/V of the step again (the
  same values at the same slots) rather than a read-only path per backend;
- a `layer_scalar` multiplying each layer's output; an optional MoE block beside the dense
  MLP (`enable_moe_block`: router with its own norm and per-expert scales, experts from
  layers/moe.py); a double-wide MLP on shared layers (`use_double_wide_mlp`);
- final logit soft cap on both classes;
- local layers optionally on rings of N tokens per sequence instead of pages, as in Gemma 3
  and by its switch ($JAXMM_GEMMA3_LOCAL_KV_TOKENS): shared local layers read their
  producer's ring (docs/gemma4.md has the KV bytes per token of each layout).

Images (the VLM): the Gemma 4 vision tower (`encoders/gemma4_vision.py`: variable-size images
as patches, 2-D RoPE, pooled k x k by patch position) -> RMSNorm without scale -> one matmul
into the text width (`embed_vision`). The image processor picks each image's size, so the
number of soft tokens varies per image (`mm_num_tokens` reads it off the patch positions).
A prompt holds the image token once where an image goes; like HF's Gemma4Processor it
becomes `<boi>` + n x image token + `<eoi>`. Image tokens enter the per-layer inputs as the
pad token (HF does the same). Where the config asks for it (`use_bidirectional_attention
== "vision"`), an image's tokens attend to each other both ways on the sliding layers only
(global layers stay causal, as in HF), and the scheduler keeps an image in one prefill chunk
(`mm_whole_items`); other configs are causal throughout, so a chunk may end inside an image.

Audio (checkpoints with an `audio_config`): the conformer tower (`encoders/gemma4_audio.py`)
-> `embed_audio` (the same embedder), one row per 40 ms of real audio. The front end makes
each clip's log-mel with the checkpoint's Gemma4AudioFeatureExtractor, unpadded
(`mm_audio_features`); a prompt holds the audio token once where a clip goes, which becomes
`<boa>` + n x audio token + `<eoa>` as in Gemma4Processor (`mm_mark_items`, on token ids, so
chat prompts get it too). Audio tokens are causal and, like image tokens, enter the per-layer
inputs as the pad token. /v1/audio/transcriptions asks for a transcription in one user turn
through the checkpoint's chat template (`transcription_chat`).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.layers.attention import AttentionMetadata
from jaxmm.layers.linear import ROW, Embed, Linear
from jaxmm.layers.mlp import GatedMLP, activation
from jaxmm.layers.moe import MoeExperts, experts_forward
from jaxmm.layers.rope import apply_rotary, cos_sin, inv_frequencies
from jaxmm.models.device_rows import DeviceRows
from jaxmm.models.encoders.gemma4_audio import (
    Gemma4AudioModel,
    audio_item_features,
    audio_num_tokens,
    encode_audio_items,
)
from jaxmm.models.encoders.gemma4_vision import Gemma4RMSNorm, Gemma4VisionModel
from jaxmm.models.gemma3 import (
    FULL,
    LOCAL_KV_ENV,
    RING_PAGE,
    SLIDING,
    Gemma3ForCausalLM,
    attention,
    image_causal_end,
    local_ring_pages,
    pages_as_ring,
    ring_as_pages,
    ring_metadata,
)
from jaxmm.models.qwen3_moe import moe_impl
from jaxmm.weights.experts import ExpertStacker

MAX_IMAGES_PER_CALL = 16  # encoder batch; smaller batches are padded to a power of two


# -- the config, as transformers 5 resolves it per layer --------------------------------------
def layer_types(config) -> list[str]:
    return list(config.layer_types)


def layer_shape(config, i: int) -> tuple[int, int]:
    """(KV heads K, head dim H) of layer i. transformers >= 5.2x keeps them in
    `per_layer_config`; older configs spell the global layers' as `global_head_dim` and
    `num_global_key_value_heads` (the latter only with `attention_k_eq_v`)."""
    per_layer = getattr(config, "per_layer_config", None)
    if per_layer is not None:
        try:
            c = per_layer[i]
            return int(c.num_key_value_heads), int(c.head_dim)
        except (KeyError, IndexError, TypeError, ValueError):
            pass
    K, H = config.num_key_value_heads, config.head_dim
    if layer_types(config)[i] == FULL:
        H = getattr(config, "global_head_dim", None) or H
        if getattr(config, "attention_k_eq_v", False):
            K = getattr(config, "num_global_key_value_heads", None) or K
    return int(K), int(H)


def allow_global_reads(config) -> None:
    """transformers 5.2x refuses global reads of a per-layer field (`head_dim`,
    `num_key_value_heads`) on a config whose layers differ, and so does the config's `==`,
    which JAX calls when it compares two models' static data (two engines in one process):
    allow them. This file reads those fields per layer (`layer_shape`)."""
    if hasattr(config, "allow_global_per_layer_attribute_access"):
        config.allow_global_per_layer_attribute_access = True


def kv_sharing(config) -> list[int | None]:
    """For each layer: None if it computes its own K/V, else the producer layer it reads
    (the last layer of its kind before the first shared one)."""
    kinds, L = layer_types(config), config.num_hidden_layers
    first = L - int(getattr(config, "num_kv_shared_layers", 0) or 0)
    if first <= 0:
        raise ValueError("num_kv_shared_layers must leave at least one layer computing K/V")
    producer = {kind: i for i, kind in enumerate(kinds[:first])}  # the last of each kind
    out: list[int | None] = []
    for i in range(L):
        if i < first:
            out.append(None)
        elif kinds[i] not in producer:
            raise ValueError(
                f"layer {i} ({kinds[i]}) shares K/V, but no earlier layer has its kind"
            )
        else:
            out.append(producer[kinds[i]])
    return out


def rope_inv_freq(config, kind: str) -> np.ndarray:
    """(H/2,) inverse frequencies of one attention kind, at that kind's head size."""
    params = dict(config.rope_parameters[kind])
    H = layer_shape(config, layer_types(config).index(kind))[1]
    if params.get("rope_type", "default") != "proportional":
        return inv_frequencies(H, params)
    # HF's proportional RoPE: the first partial_rotary_factor * H / 2 frequencies over the
    # whole head size, the rest zero; all divided by `factor`
    angles = int(float(params.get("partial_rotary_factor", 1.0)) * H // 2)
    exps = np.arange(0, 2 * angles, 2, dtype=np.int64).astype(np.float32) / H
    inv = 1.0 / (float(params["rope_theta"]) ** exps)
    inv = np.concatenate([inv, np.zeros(H // 2 - angles, np.float32)])
    return (inv / float(params.get("factor", 1.0))).astype(np.float32)


# -- layers -----------------------------------------------------------------------------------
class Gemma4TextAttention(nnx.Module):
    def __init__(self, config, layer_idx: int, *, dtype, attention_backend: str, rngs):
        D, eps = config.hidden_size, config.rms_norm_eps
        self.N = config.num_attention_heads
        self.K, self.H = layer_shape(config, layer_idx)
        self.kind = layer_types(config)[layer_idx]
        self.shared = kv_sharing(config)[layer_idx] is not None
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = Linear(D, self.N * self.H, bias=bias, dtype=dtype, rngs=rngs)
        self.q_norm = Gemma4RMSNorm(self.H, eps, dtype=dtype)
        # values are the keys' projection on global layers with attention_k_eq_v
        self.k_eq_v = bool(getattr(config, "attention_k_eq_v", False)) and self.kind != SLIDING
        if not self.shared:  # shared layers read their producer's K/V: no weights for it
            self.k_proj = Linear(D, self.K * self.H, bias=bias, dtype=dtype, rngs=rngs)
            if not self.k_eq_v:
                self.v_proj = Linear(D, self.K * self.H, bias=bias, dtype=dtype, rngs=rngs)
            self.k_norm = Gemma4RMSNorm(self.H, eps, dtype=dtype)
            self.v_norm = Gemma4RMSNorm(self.H, eps, dtype=dtype, with_scale=False)
        self.o_proj = Linear(self.N * self.H, D, bias=bias, dtype=dtype, shard=ROW, rngs=rngs)
        self.sliding_window = config.sliding_window if self.kind == SLIDING else None
        self.backend = attention_backend

    def __call__(self, x, cos, sin, kv_pages, md: AttentionMetadata, causal_end=None, kv=None):
        """-> (out (T, D), kv_pages, (k, v) of the step). `kv`: a shared layer's producer K/V."""
        T = x.shape[0]
        q = apply_rotary(self.q_norm(self.q_proj(x).reshape(T, self.N, self.H)), cos, sin)
        if kv is None:
            raw_k = self.k_proj(x).reshape(T, self.K, self.H)  # (T, K, H)
            raw_v = raw_k if self.k_eq_v else self.v_proj(x).reshape(T, self.K, self.H)
            kv = (apply_rotary(self.k_norm(raw_k), cos, sin), self.v_norm(raw_v))
        out, kv_pages = attention(
            q,
            *kv,
            kv_pages,
            md,
            causal_end,
            backend=self.backend,
            sm_scale=1.0,
            sliding_window=self.sliding_window,
            soft_cap=None,
        )
        return self.o_proj(out.reshape(T, self.N * self.H)), kv_pages, kv


class Gemma4TextRouter(nnx.Module):
    """Scores experts from the layer's input: RMSNorm (no scale) * scale * D^-0.5 -> proj ->
    softmax in float32 -> top-k renormalised -> times each chosen expert's scale."""

    def __init__(self, config, *, dtype, rngs):
        D, E = config.hidden_size, config.num_experts
        self.norm = Gemma4RMSNorm(D, config.rms_norm_eps, dtype=dtype, with_scale=False)
        self.proj = Linear(D, E, dtype=dtype, rngs=rngs)
        self.scale = nnx.Param(jnp.ones((D,), dtype))
        self.per_expert_scale = nnx.Param(jnp.ones((E,), dtype))
        self.root = D**-0.5
        self.top_k = config.top_k_experts

    def __call__(self, x):
        h = self.norm(x) * self.scale[...] * jnp.asarray(self.root, x.dtype)
        probs = jax.nn.softmax(self.proj(h).astype(jnp.float32), axis=-1)
        weights, ids = jax.lax.top_k(probs, self.top_k)
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights * self.per_expert_scale[...][ids].astype(jnp.float32)
        return weights, ids.astype(jnp.int32)


class Gemma4TextDecoderLayer(nnx.Module):
    def __init__(self, config, layer_idx: int, *, dtype, attention_backend: str, rngs):
        D, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma4TextAttention(
            config, layer_idx, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        self.act = config.hidden_activation
        wide = bool(getattr(config, "use_double_wide_mlp", False)) and self.self_attn.shared
        F = config.intermediate_size * (2 if wide else 1)
        self.mlp = GatedMLP(D, F, self.act, dtype=dtype, rngs=rngs)
        self.input_layernorm = Gemma4RMSNorm(D, eps, dtype=dtype)
        self.post_attention_layernorm = Gemma4RMSNorm(D, eps, dtype=dtype)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(D, eps, dtype=dtype)
        self.post_feedforward_layernorm = Gemma4RMSNorm(D, eps, dtype=dtype)
        self.layer_scalar = nnx.Param(jnp.ones((1,), dtype))
        self.Dp = getattr(config, "hidden_size_per_layer_input", 0) or 0
        if self.Dp:
            self.per_layer_input_gate = Linear(D, self.Dp, dtype=dtype, rngs=rngs)
            self.per_layer_projection = Linear(self.Dp, D, dtype=dtype, shard=ROW, rngs=rngs)
            self.post_per_layer_input_norm = Gemma4RMSNorm(D, eps, dtype=dtype)
        self.moe = bool(getattr(config, "enable_moe_block", False))
        if self.moe:
            self.router = Gemma4TextRouter(config, dtype=dtype, rngs=rngs)
            E, F = config.num_experts, config.moe_intermediate_size
            self.experts = MoeExperts(E, D, F, dtype=dtype, rngs=rngs)
            self.post_feedforward_layernorm_1 = Gemma4RMSNorm(D, eps, dtype=dtype)
            self.post_feedforward_layernorm_2 = Gemma4RMSNorm(D, eps, dtype=dtype)
            self.pre_feedforward_layernorm_2 = Gemma4RMSNorm(D, eps, dtype=dtype)
            self.impl = moe_impl()

    def __call__(self, x, cos, sin, kv_pages, md, per_layer_input, causal_end=None, kv=None):
        h, kv_pages, kv = self.self_attn(
            self.input_layernorm(x), cos, sin, kv_pages, md, causal_end, kv
        )
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe:  # experts beside the dense MLP, routed from the same residual
            weights, ids = self.router(x)
            e = self.experts
            routed = experts_forward(
                self.pre_feedforward_layernorm_2(x),
                weights,
                ids,
                e.gate_proj[...],
                e.up_proj[...],
                e.down_proj[...],
                activation(self.act),
                self.impl,
                jnp.arange(x.shape[0]) < md.cu_q_lens[-1],  # padding tokens route nowhere
            )
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(routed)
        x = x + self.post_feedforward_layernorm(h)
        if self.Dp:
            g = activation(self.act)(self.per_layer_input_gate(x)) * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar[...], kv_pages, kv


class Gemma4TextModel(nnx.Module):
    def __init__(self, config, *, dtype, attention_backend: str, rngs):
        D, L = config.hidden_size, config.num_hidden_layers
        self.embed_tokens = Embed(config.vocab_size, D, dtype=dtype, rngs=rngs)
        # HF multiplies by sqrt(D) cast to the weights' dtype (as Gemma 3)
        self.embed_scale = _in_dtype(D**0.5, dtype)
        self.layers = nnx.List(
            [
                Gemma4TextDecoderLayer(
                    config, i, dtype=dtype, attention_backend=attention_backend, rngs=rngs
                )
                for i in range(L)
            ]
        )
        self.norm = Gemma4RMSNorm(D, config.rms_norm_eps, dtype=dtype)
        self.Dp = getattr(config, "hidden_size_per_layer_input", 0) or 0
        if self.Dp:
            V = config.vocab_size_per_layer_input
            self.embed_tokens_per_layer = Embed(V, L * self.Dp, dtype=dtype, rngs=rngs)
            self.ple_scale = _in_dtype(self.Dp**0.5, dtype)
            self.per_layer_model_projection = Linear(D, L * self.Dp, dtype=dtype, rngs=rngs)
            self.per_layer_projection_norm = Gemma4RMSNorm(
                self.Dp, config.rms_norm_eps, dtype=dtype
            )
        self.D, self.L = D, L
        self.kinds = tuple(layer_types(config))
        self.producer = tuple(kv_sharing(config))
        # local layers on rings ($JAXMM_GEMMA3_LOCAL_KV_TOKENS, as in gemma3.py): the paged
        # caches are then the global layers', the rings follow them
        self.ring_pages = local_ring_pages(config)
        self.window = config.sliding_window
        # each layer's cache: the layers computing K/V in layer order (paged global layers
        # first when local ones are on rings); a shared layer uses its producer's
        own = [i for i, p in enumerate(self.producer) if p is None]
        if self.ring_pages:
            own.sort(key=lambda i: self.kinds[i] != FULL)
        index = {layer: n for n, layer in enumerate(own)}
        self.slot = tuple(index[i if p is None else p] for i, p in enumerate(self.producer))
        self.cached_layers = tuple(own)
        self.num_cached = len(own)
        self.num_paged = sum(self.kinds[i] == FULL for i in own) if self.ring_pages else len(own)
        self.inv_freq = {
            kind: tuple(float(f) for f in rope_inv_freq(config, kind))
            for kind in sorted(set(self.kinds))
        }

    def embed(self, input_ids: jax.Array) -> jax.Array:
        x = self.embed_tokens(input_ids)
        return x * jnp.asarray(self.embed_scale, x.dtype)

    def per_layer_inputs(self, ple_ids: jax.Array, x: jax.Array) -> jax.Array:
        """(T,) ids and the step's input embeddings (T, D) -> (T, L, Dp): HF's token part
        (its own table) plus the context part (a projection of x), scaled by 2^-0.5."""
        T = x.shape[0]
        tok = self.embed_tokens_per_layer(ple_ids)
        tok = (tok * jnp.asarray(self.ple_scale, tok.dtype)).reshape(T, self.L, self.Dp)
        ctx = self.per_layer_model_projection(x) * jnp.asarray(self.D**-0.5, x.dtype)
        ctx = self.per_layer_projection_norm(ctx.reshape(T, self.L, self.Dp))
        return (ctx + tok) * jnp.asarray(2.0**-0.5, x.dtype)

    def __call__(
        self, input_ids, kv_caches, md, inputs_embeds=None, causal_end=None, ple_ids=None,
        slots=None,
    ):  # fmt: skip
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (T, D)
        ple = None
        if self.Dp:
            ple = self.per_layer_inputs(input_ids if ple_ids is None else ple_ids, x)
        rotary = {
            kind: cos_sin(md.positions, jnp.asarray(np.array(f, np.float32)))
            for kind, f in self.inv_freq.items()
        }
        caches = list(kv_caches)
        local_md = md
        if self.ring_pages:  # rings read as page pools through a page table of their own
            R, T = self.ring_pages, x.shape[0]
            if R * RING_PAGE < self.window + T - 1:
                raise ValueError(
                    f"{LOCAL_KV_ENV}={R * RING_PAGE} holds fewer tokens than the sliding window "
                    f"({self.window}) plus a step of {T} tokens needs: set it to at least "
                    f"sliding_window + max_num_batched_tokens - 1 = {self.window + T - 1}"
                )
            G = caches[0].shape[3]
            local_md = ring_metadata(md, slots, R, -(-md.page_indices.shape[1] * G // RING_PAGE))
            Z = caches[self.num_paged].shape[0] if self.num_cached > self.num_paged else 0
            for n in range(self.num_paged, self.num_cached):
                caches[n] = ring_as_pages(caches[n])
        step_kv = {}  # producer layer -> its K/V of this step, for the layers sharing them
        for i, layer in enumerate(self.layers):
            kind, p = self.kinds[i], self.producer[i]
            # bidirectional image attention on sliding layers only (HF's Gemma 4 masks)
            end = causal_end if kind == SLIDING else None
            s = self.slot[i]
            x, caches[s], kv = layer(
                x,
                *rotary[kind],
                caches[s],
                local_md if kind == SLIDING else md,
                None if ple is None else ple[:, i],
                end,
                None if p is None else step_kv[p],
            )
            step_kv[i] = kv
        if self.ring_pages:
            for n in range(self.num_paged, self.num_cached):
                caches[n] = pages_as_ring(caches[n], Z)
        return self.norm(x), caches


def _in_dtype(value: float, dtype) -> float:
    return float(np.asarray(value, np.float32).astype(jnp.dtype(dtype)))


class Gemma4ForCausalLM(nnx.Module):
    ignored_hf_keys = (r"rotary_emb\.", r"embed_scale$")

    def __init__(self, config, *, dtype=jnp.float32, attention_backend: str = "reference", rngs):
        if getattr(config, "use_bidirectional_attention", None) == "all":
            raise ValueError(
                "Gemma 4 with use_bidirectional_attention='all' (an encoder) is not supported"
            )
        allow_global_reads(config)
        self.config = config
        self.model = Gemma4TextModel(
            config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        if not self.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs)
        self.final_soft_cap = getattr(config, "final_logit_softcapping", None)

    def hf_tensor_converter(self) -> ExpertStacker:
        """Splits the fused `experts.gate_up_proj` (E, 2F, D) as the loader streams it."""
        return ExpertStacker(int(getattr(self.config, "num_experts", None) or 0))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.model.embed(input_ids)

    def __call__(
        self, input_ids, kv_caches, md: AttentionMetadata, inputs_embeds=None, seq_inputs=None,
        causal_end=None, ple_ids=None,
    ):  # fmt: skip
        slots = None
        if self.model.ring_pages:  # each running sequence's ring slot (as gemma3.py)
            if seq_inputs is not None and "state_slot" in seq_inputs:
                slots = seq_inputs["state_slot"]
            else:  # no request in the step: every row uses the scratch slot
                slots = jnp.full(md.kv_lens.shape, kv_caches[-1].shape[0] - 1, jnp.int32)
        return self.model(input_ids, kv_caches, md, inputs_embeds, causal_end, ple_ids, slots)

    # the same head as Gemma 3's (tied or not, the final soft cap), on the same attributes
    compute_logits = Gemma3ForCausalLM.compute_logits

    def kv_cache_layer_shapes(self) -> list[tuple[int, int]]:
        """(K, H) of each paged layer's page pool (layer order; global layers only when the
        local ones keep rings): shared layers have none."""
        m = self.model
        return [layer_shape(self.config, i) for i in m.cached_layers[: m.num_paged]]

    def kv_cache_spec(self) -> tuple[int, int, int]:
        """(paged layers L, K, H) of the first paged layer; `kv_cache_layer_shapes` has
        every layer's."""
        return (self.model.num_paged, *self.kv_cache_layer_shapes()[0])

    def state_cache_spec(self, dtype) -> list[tuple[tuple[int, ...], jnp.dtype]]:
        """Per-slot (shape, dtype) of each local layer's ring (none when off)."""
        m = self.model
        if not m.ring_pages:
            return []
        shapes = [layer_shape(self.config, i) for i in m.cached_layers[m.num_paged :]]
        return [((2, K, m.ring_pages, RING_PAGE, H), dtype) for K, H in shapes]


# ---------------------------------------------------------------------------------------
# Gemma4ForConditionalGeneration


class Gemma4MultimodalEmbedder(nnx.Module):
    """Tower features (n, Dv) -> RMSNorm without scale -> (n, D_text)."""

    def __init__(self, mm_config, text_config, *, dtype, rngs):
        Dm = getattr(mm_config, "output_proj_dims", None) or mm_config.hidden_size
        self.embedding_pre_projection_norm = Gemma4RMSNorm(
            Dm, mm_config.rms_norm_eps, dtype=dtype, with_scale=False
        )
        self.embedding_projection = Linear(Dm, text_config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


def language_config(config):
    """The text config, with tied embeddings resolved from both configs."""
    text_config = copy.copy(config.text_config)
    text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True)) or bool(
        getattr(text_config, "tie_word_embeddings", False)
    )
    return text_config


class Gemma4ForConditionalGeneration(nnx.Module):
    is_multimodal = True
    mm_modalities = ("image",)
    uses_mrope = False
    hf_key_rules = (
        (r"^model\.language_model\.", "language_model.model."),
        (r"^model\.vision_tower\.", "vision_tower."),
        (r"^model\.embed_vision\.", "embed_vision."),
        (r"^model\.audio_tower\.", "audio_tower."),
        (r"^model\.embed_audio\.", "embed_audio."),
        (r"^lm_head\.", "language_model.lm_head."),
    )

    def __init__(self, config, *, dtype=jnp.float32, attention_backend: str = "reference", rngs):
        allow_global_reads(config.text_config)
        self.hf_config = config
        self.config = text_config = language_config(config)
        self.vision_tower = Gemma4VisionModel(config.vision_config, dtype=dtype, rngs=rngs)
        self.embed_vision = Gemma4MultimodalEmbedder(
            config.vision_config, text_config, dtype=dtype, rngs=rngs
        )
        self.language_model = Gemma4ForCausalLM(
            text_config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        ignored = [r"rotary_emb\.", r"embed_scale$"]
        self.audio_token_id = -1  # no audio: matches no token
        if getattr(config, "audio_config", None) is not None:
            self.mm_modalities = ("image", "audio")
            self.audio_tower = Gemma4AudioModel(config.audio_config, dtype=dtype, rngs=rngs)
            self.embed_audio = Gemma4MultimodalEmbedder(
                config.audio_config, text_config, dtype=dtype, rngs=rngs
            )
            self.audio_token_id = int(config.audio_token_id)
        if text_config.tie_word_embeddings:
            ignored.append(r"^language_model\.lm_head\.weight$")
        self.ignored_hf_keys = tuple(ignored)
        self.image_token_id = int(config.image_token_id)
        self.pad_token_id = int(getattr(text_config, "pad_token_id", None) or 0)
        # bidirectional image tokens need an image's tokens in one step
        self.bidirectional = getattr(text_config, "use_bidirectional_attention", None) == "vision"
        self.mm_whole_items = self.bidirectional
        self.backend = attention_backend
        self.dtype = dtype

    def hf_tensor_converter(self) -> ExpertStacker:
        return self.language_model.hf_tensor_converter()

    # -- the text path (what the runner's step calls) ----------------------------------------
    def _text_ids(self, input_ids: jax.Array) -> jax.Array:
        """Multimodal placeholders -> the pad token, as HF embeds them (and looks up their
        per-layer inputs)."""
        # HF masks every placeholder its config names (video and audio too, even in a model
        # without that tower: a generated one is embedded as the pad token)
        c = self.hf_config
        names = ("image_token_id", "video_token_id", "audio_token_id")
        ids = [int(t) for t in (getattr(c, n, None) for n in names) if t is not None]
        mm = jnp.isin(input_ids, jnp.asarray(ids, jnp.int32))
        return jnp.where(mm, self.pad_token_id, input_ids)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.language_model.embed(self._text_ids(input_ids))

    def __call__(
        self, input_ids, kv_caches, md: AttentionMetadata, inputs_embeds=None, seq_inputs=None
    ):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        ple_ids = self._text_ids(input_ids)
        lm = self.language_model

        def run(caches, causal_end=None):
            return lm(input_ids, caches, md, inputs_embeds, seq_inputs, causal_end, ple_ids)

        if not self.bidirectional:
            return run(kv_caches)
        causal_end = image_causal_end(input_ids, md, self.image_token_id)
        if self.backend in ("reference", "xla"):  # the mask costs nothing there
            return run(kv_caches, causal_end)
        # kernels take no mask: a step with image tokens runs on the XLA path (gemma3.py)
        return jax.lax.cond(jnp.any(causal_end >= 0), lambda c: run(c, causal_end), run, kv_caches)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        return self.language_model.compute_logits(hidden)

    def kv_cache_layer_shapes(self) -> list[tuple[int, int]]:
        return self.language_model.kv_cache_layer_shapes()

    def kv_cache_spec(self) -> tuple[int, int, int]:
        return self.language_model.kv_cache_spec()

    def state_cache_spec(self, dtype) -> list[tuple[tuple[int, ...], jnp.dtype]]:
        return self.language_model.state_cache_spec(dtype)

    # -- images --------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: jax.Array, positions: jax.Array) -> jax.Array:
        """pixel_values (B, P, 3 p^2), positions (B, P, 2) -> (B, P / k^2, D_text); image b's
        features are its first n_b rows (see `mm_num_tokens`)."""
        feats = self.vision_tower(pixel_values.astype(self.dtype), positions)
        return self.embed_vision(feats)

    # -- the multimodal contract (plain Python; see llava.py's docstring) ---------------------
    def mm_token_id(self, modality: str) -> int:
        return self.audio_token_id if modality == "audio" else self.image_token_id

    def mm_placeholder_text(self, modality: str) -> str:
        """The placeholder as Gemma 4's tokenizer spells it (a prompt holds it once per item)."""
        return "<|audio|>" if modality == "audio" else "<|image|>"

    def mm_prompt_placeholder(self, modality: str) -> list[int]:
        """What a prompt holds where an image goes: the image token, once."""
        return [self.image_token_id]

    def mm_expand_prompt_text(self, text: str, tokenizer) -> str:
        """Each image token -> `<boi>` image token `<eoi>` before tokenizing (Gemma4Processor
        wraps every one; the front end then repeats the image token n times)."""
        boi = tokenizer.convert_ids_to_tokens(int(self.hf_config.boi_token_id))
        eoi = tokenizer.convert_ids_to_tokens(int(self.hf_config.eoi_token_id))
        image = tokenizer.convert_ids_to_tokens(self.image_token_id)
        return text.replace(image, f"{boi}{image}{eoi}")

    def mm_mark_items(self, ids: list[int], encode_text=None) -> list[int]:
        """Each image placeholder between `<boi>` and `<eoi>`, each audio one between `<boa>`
        and `<eoa>`, a token or an expanded run, as Gemma4Processor writes them (text,
        token-id and chat prompts alike), unless already there."""
        c = self.hf_config
        marks = {self.image_token_id: (int(c.boi_token_id), int(c.eoi_token_id))}
        if self.audio_token_id >= 0:
            eoa = int(getattr(c, "eoa_token_id", c.eoa_token_index))
            marks[self.audio_token_id] = (int(c.boa_token_id), eoa)
        out: list[int] = []
        for i, t in enumerate(ids):
            if t not in marks:
                out.append(t)
                continue
            begin, end = marks[t]
            if (i == 0 or ids[i - 1] != t) and (i == 0 or ids[i - 1] != begin):  # a run starts
                out.append(begin)
            out.append(t)
            last = i + 1 == len(ids)
            if (last or ids[i + 1] != t) and (last or ids[i + 1] != end):  # a run ends
                out.append(end)
        return out

    def transcription_chat(self, language: str | None) -> list[dict]:
        """/v1/audio/transcriptions: the request as one user turn (rendered by the checkpoint's
        chat template), the audio after the instruction."""
        into = ""
        if language:
            from transformers.models.whisper.tokenization_whisper import LANGUAGES

            into = f" into {LANGUAGES.get(language.lower(), language).title()}"
        return [{"role": "user", "content": f"Transcribe this audio{into}: <|audio|>"}]

    def _pooling(self) -> int:
        return int(self.hf_config.vision_config.pooling_kernel_size)

    def mm_num_tokens(self, modality: str, item: dict) -> int:
        if modality == "audio":  # one row per real frame after the 4x subsampling
            return audio_num_tokens(item["input_features_mask"])
        vc = self.hf_config.vision_config
        pixels, pos = np.shape(item["pixel_values"]), item.get("image_position_ids")
        width = 3 * vc.patch_size**2
        if len(pixels) != 2 or pixels[1] != width or pos is None:
            raise ValueError(
                f"the image processor produced pixel values of shape {tuple(pixels)}; this "
                f"model's vision tower takes (patches, {width}) with image_position_ids "
                "(Gemma4ImageProcessor)"
            )
        k2 = self._pooling() ** 2
        if pixels[0] % k2:
            raise ValueError(f"{pixels[0]} patches do not pool by {k2}")
        return int(np.all(np.asarray(pos) >= 0, axis=-1).sum()) // k2

    # the audio front end's hook: a clip's unpadded log-mel and real-frame mask
    mm_audio_features = staticmethod(audio_item_features)

    def mm_check_embeds(self, modality: str, embeds: np.ndarray, meta: dict) -> dict:
        if embeds.ndim != 2 or embeds.shape[1] != self.config.hidden_size or not len(embeds):
            raise ValueError(
                f"{modality} embeddings must have shape (num_tokens, hidden_size="
                f"{self.config.hidden_size}); got {tuple(embeds.shape)}"
            )
        return {}

    def mm_encoder(self, graphdef):
        """A host function (params, modality, items) -> [features (n, D_text) per item], left
        on the device (`DeviceRows`) for the runner to splice."""
        from jaxmm.models.encoder_jit import encoder_jit

        @encoder_jit
        def run(params, pixel_values, positions):
            return nnx.merge(graphdef, params).get_image_features(pixel_values, positions)

        @encoder_jit
        def run_audio(params, features, mask):
            model = nnx.merge(graphdef, params)
            return model.embed_audio(model.audio_tower(features, mask)[0])

        def encode(params, modality: str, items: list[dict]) -> list[DeviceRows]:
            if modality == "audio":
                return encode_audio_items(run_audio, params, items)
            out = []
            for i in range(0, len(items), MAX_IMAGES_PER_CALL):
                chunk = items[i : i + MAX_IMAGES_PER_CALL]
                pixels = np.stack([np.asarray(it["pixel_values"], np.float32) for it in chunk])
                pos = np.stack([np.asarray(it["image_position_ids"], np.int32) for it in chunk])
                B = 1 << max(0, (len(chunk) - 1).bit_length())  # one program per power of two
                pad_pixels = np.zeros((B, *pixels.shape[1:]), np.float32)
                pad_pos = np.full((B, *pos.shape[1:]), -1, np.int32)
                pad_pixels[: len(chunk)], pad_pos[: len(chunk)] = pixels, pos
                feats = run(params, pad_pixels, pad_pos)  # (B, n_max, D_text)
                n_max = feats.shape[1]
                flat = feats.reshape(-1, feats.shape[-1])
                for j, it in enumerate(chunk):
                    n = self.mm_num_tokens(modality, it)
                    out.append(DeviceRows(flat, j * n_max, j * n_max + n))
            return out

        return encode
