"""Gemma 3: text (`Gemma3ForCausalLM`) and vision (`Gemma3ForConditionalGeneration`), HF names.

Attention -> DecoderLayer -> Model -> ForCausalLM, then the projector and the VLM.
What sets Gemma 3 apart from the Llama decoder (`llama.py`):
- per-layer attention kinds (`layer_types`): "sliding_attention" layers see a window of
  `sliding_window` tokens and rotate with their own RoPE (`rope_parameters
  ["sliding_attention"]`, the old `rope_local_base_freq`); "full_attention" layers see all
  and rotate with the global RoPE (theta 1e6, linear scaling on the larger models);
- RMSNorm on q and k per head, scores scaled by `query_pre_attn_scalar ** -0.5`, optional
  attention logit soft cap and final logit soft cap;
- Gemma RMSNorm (scale 1 + w, multiplied in float32), four norms per layer (the "sandwich":
  pre and post the attention and the MLP), embeddings scaled by sqrt(D) in the model dtype.

Images (the VLM): SigLIP tower -> average pool to `mm_tokens_per_image` -> Gemma RMSNorm ->
one matmul into the text width. The prompt holds `<start_of_image>` where an image goes; like
HF's Gemma3Processor, it becomes "\\n\\n<start_of_image>" + `mm_tokens_per_image` x
`<image_soft_token>` + "<end_of_image>\\n\\n" before tokenizing (`mm_expand_prompt_text`).
During prefill the soft tokens of one image attend to each other both ways (HF's
`token_type_ids` mask): the step passes each such token the position of its image's last
token (`causal_end`), and the scheduler keeps an image inside one prefill chunk
(`mm_whole_items`), so an image's tokens are always computed together. With pan-and-scan
(`do_pan_and_scan`) an image is one item of the original and its crops: its span is
Gemma3Processor's text from the first soft token to the last (`mm_span_ids`), its rows the
tower's at soft tokens and the text's embeddings between (docs/gemma3.md).

Sliding-window KV, by default: a local layer never reads a key older than its window, so its
pages are given back as the sequence moves on. The layers are paged in groups
(`kv_cache_groups`): group 0 the global layers, then the local layers in runs of as many
(the last run padded); each group has a page table of its own per sequence, and page p of
every group lies in the same n_global arrays (array j holds the j-th layer of whichever group
owns page p), so one pool serves all groups with no waste. The engine's block manager gives a
local group's pages back once they fall behind the window and keeps prefix caching (a hit
needs each local group's last window of pages still cached). A sequence holds its context in
the global layers plus about one window (and one step) per local group.
$JAXMM_SLIDING_WINDOW_RECLAIM=0 pages every layer for the whole context instead (one table).

Sliding-window rings (opt-in, $JAXMM_GEMMA3_LOCAL_KV_TOKENS = N > 0): a local layer never reads
a key older than its window, so it keeps no pages for them. Each running sequence owns a
state slot (`jaxmm.engine.state_cache`, as hybrid models do) holding, per local layer, a
ring of N tokens (rounded up to pages of `RING_PAGE`): token p lives at ring entry p mod N,
and the ring is read through a page table of its own (logical page i -> ring page i mod R),
so the attention kernels and their sliding-window mask run unchanged. Only the global
layers take pages from the paged pool (`kv_cache_spec`), so a sequence costs global-layer
KV per token plus a fixed N tokens per local layer. N must cover the window plus the
longest chunk a step computes (sliding_window + max_num_batched_tokens - 1): a step's keys
are written before its queries read the ring. The ring cannot be rebuilt from cached
pages, so the engine gives such a model no prefix-cache hits (as for hybrid models), and
every slot is reserved for `max_num_seqs` sequences: it pays for long contexts with few
sequences, not for many short ones, hence opt-in.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.kernels import backends
from jaxmm.kernels.reference import token_metadata
from jaxmm.layers.attention import AttentionMetadata, paged_attention
from jaxmm.layers.linear import ROW, Embed, Linear
from jaxmm.layers.mlp import GatedMLP
from jaxmm.layers.norm import GemmaRMSNorm
from jaxmm.layers.rope import apply_rotary, cos_sin, inv_frequencies
from jaxmm.models.device_rows import DeviceRows
from jaxmm.models.encoders import siglip
from jaxmm.models.encoders.siglip import SiglipVisionModel
from jaxmm.models.image_tokens import FixedImageTokens

SLIDING, FULL = "sliding_attention", "full_attention"
LOCAL_KV_ENV = "JAXMM_GEMMA3_LOCAL_KV_TOKENS"  # > 0: local layers keep a ring of that many
RING_PAGE = 16  # tokens per page of a local layer's ring
RECLAIM_ENV = "JAXMM_SLIDING_WINDOW_RECLAIM"  # "0": every layer paged for the whole context
MAX_IMAGES_PER_CALL = 16  # encoder batch; smaller batches are padded to a power of two


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_types(config) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types is None:  # configs from before layer_types: every 6th layer is global
        pattern = getattr(config, "sliding_window_pattern", 6)
        n = config.num_hidden_layers
        types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]
    return list(types)


def rope_params(config, kind: str) -> dict:
    """The RoPE parameters of one attention kind, from either config spelling: transformers
    5's `rope_parameters` keyed by layer type, or the flat `rope_theta` / `rope_scaling`
    (global) and `rope_local_base_freq` (local) of older configs."""
    nested = getattr(config, "rope_parameters", None) or {}
    if kind in nested:
        params = dict(nested[kind])
    elif kind == SLIDING:
        params = {"rope_theta": getattr(config, "rope_local_base_freq", 10000.0)}
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 1_000_000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def image_causal_end(input_ids, md: AttentionMetadata, image_token_id: int) -> jax.Array:
    """(T,) for `paged_attention`'s causal_end: for each image token, the position of the
    last token of its run of image tokens in this step (same sequence); -1 elsewhere."""
    T = input_ids.shape[0]
    seq_ids, pos, valid = token_metadata(md.kv_lens, md.cu_q_lens, md.num_seqs, T)
    is_img = (input_ids == image_token_id) & valid
    nxt = jnp.concatenate([is_img[1:] & (seq_ids[1:] == seq_ids[:-1]), jnp.zeros(1, bool)])
    run_last = is_img & ~nxt  # the last token of each run
    idx = jnp.arange(T, dtype=jnp.int32)
    last_idx = jax.lax.cummin(jnp.where(run_last, idx, T - 1), axis=0, reverse=True)
    return jnp.where(is_img, pos[last_idx], -1).astype(jnp.int32)


def attention(q, k, v, kv_pages, md, causal_end, *, backend: str, **kw):
    """`paged_attention`, bidirectional where `causal_end` says so (see `image_causal_end`).

    The pure-JAX backends take the mask directly; with a kernel backend a mask means the XLA
    path (the VLM picks, once per step, whether the step needs one: `uses_mask`).
    """
    if causal_end is None:
        return paged_attention(q, k, v, kv_pages, md, backend=backend, **kw)
    meta = (md.kv_lens, md.page_indices, md.cu_q_lens, md.num_seqs)
    if backend not in ("reference", "xla"):
        r = kv_pages.shape[1] // k.shape[1]  # KV heads replicated for tensor parallelism
        k, v = (jnp.repeat(k, r, axis=1), jnp.repeat(v, r, axis=1)) if r > 1 else (k, v)
        backend = "xla"
    return backends.attention_fn(backend)(q, k, v, kv_pages, *meta, causal_end=causal_end, **kw)


def local_ring_pages(config) -> int:
    """Ring pages per local layer and sequence from $JAXMM_GEMMA3_LOCAL_KV_TOKENS (0: off)."""
    tokens = int(os.environ.get(LOCAL_KV_ENV, "0") or 0)
    if tokens <= 0 or SLIDING not in layer_types(config):
        return 0
    return -(-tokens // RING_PAGE)


def page_groups(kinds) -> list[tuple[int, ...]]:
    """Layer indices of each page group: the global layers, then the local layers in runs of
    as many (see the module doc); [] when the layers are all of one kind or reclaiming is off."""
    glob = tuple(i for i, k in enumerate(kinds) if k == FULL)
    local = [i for i, k in enumerate(kinds) if k != FULL]
    if not glob or not local or os.environ.get(RECLAIM_ENV, "1") == "0":
        return []
    n = len(glob)
    return [glob] + [tuple(local[j : j + n]) for j in range(0, len(local), n)]


def ring_as_pages(ring: jax.Array) -> jax.Array:
    """(Z slots, 2, K, R, G, H) -> the page pool (2, K, Z * R, G, H) the kernels read."""
    Z, _, K, R, G, H = ring.shape
    return ring.transpose(1, 2, 0, 3, 4, 5).reshape(2, K, Z * R, G, H)


def pages_as_ring(pages: jax.Array, Z: int) -> jax.Array:
    _, K, A, G, H = pages.shape
    return pages.reshape(2, K, Z, A // Z, G, H).transpose(2, 0, 1, 3, 4, 5)


def ring_metadata(md: AttentionMetadata, slots, R: int, num_pages: int) -> AttentionMetadata:
    """`md` with each row's page table on its slot's ring: logical page i -> i mod R."""
    table = slots[:, None] * R + (jnp.arange(num_pages, dtype=jnp.int32) % R)[None, :]
    return dataclasses.replace(md, page_indices=table.astype(jnp.int32))


class Gemma3Attention(nnx.Module):
    def __init__(self, config, layer_idx: int, *, dtype, attention_backend: str, rngs):
        D = config.hidden_size
        self.N = config.num_attention_heads
        self.K = config.num_key_value_heads
        self.H = head_dim(config)
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = Linear(D, self.N * self.H, bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(D, self.K * self.H, bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(D, self.K * self.H, bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(self.N * self.H, D, bias=bias, dtype=dtype, shard=ROW, rngs=rngs)
        self.q_norm = GemmaRMSNorm(self.H, config.rms_norm_eps, dtype=dtype)
        self.k_norm = GemmaRMSNorm(self.H, config.rms_norm_eps, dtype=dtype)
        self.kind = layer_types(config)[layer_idx]
        self.sliding_window = config.sliding_window if self.kind == SLIDING else None
        self.scale = float(config.query_pre_attn_scalar) ** -0.5
        # transformers' Gemma3Attention keeps `attn_logit_softcapping` but never hands it to
        # the attention function (5.24), and released Gemma 3 configs set it to null: no cap
        self.soft_cap = None
        self.backend = attention_backend

    def __call__(self, x, cos, sin, kv_pages, md: AttentionMetadata, causal_end=None):
        T = x.shape[0]
        q = self.q_norm(self.q_proj(x).reshape(T, self.N, self.H))  # (T, N, H)
        k = self.k_norm(self.k_proj(x).reshape(T, self.K, self.H))  # (T, K, H)
        v = self.v_proj(x).reshape(T, self.K, self.H)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out, kv_pages = attention(
            q,
            k,
            v,
            kv_pages,
            md,
            causal_end,
            backend=self.backend,
            sm_scale=self.scale,
            sliding_window=self.sliding_window,
            soft_cap=self.soft_cap,
        )
        return self.o_proj(out.reshape(T, self.N * self.H)), kv_pages


class Gemma3DecoderLayer(nnx.Module):
    def __init__(self, config, layer_idx: int, *, dtype, attention_backend: str, rngs):
        D, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma3Attention(
            config, layer_idx, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        self.mlp = GatedMLP(D, config.intermediate_size, act, dtype=dtype, rngs=rngs)
        self.input_layernorm = GemmaRMSNorm(D, eps, dtype=dtype)
        self.post_attention_layernorm = GemmaRMSNorm(D, eps, dtype=dtype)
        self.pre_feedforward_layernorm = GemmaRMSNorm(D, eps, dtype=dtype)
        self.post_feedforward_layernorm = GemmaRMSNorm(D, eps, dtype=dtype)

    def __call__(self, x, cos, sin, kv_pages, md, causal_end=None):
        h, kv_pages = self.self_attn(self.input_layernorm(x), cos, sin, kv_pages, md, causal_end)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h), kv_pages


class Gemma3TextModel(nnx.Module):
    def __init__(self, config, *, dtype, attention_backend: str, rngs):
        D = config.hidden_size
        self.embed_tokens = Embed(config.vocab_size, D, dtype=dtype, rngs=rngs)
        # HF multiplies by sqrt(D) cast to the weights' dtype (55.5 in bf16 for D = 3072)
        self.embed_scale = float(np.asarray(D**0.5, np.float32).astype(jnp.dtype(dtype)))
        self.layers = nnx.List(
            [
                Gemma3DecoderLayer(
                    config, i, dtype=dtype, attention_backend=attention_backend, rngs=rngs
                )
                for i in range(config.num_hidden_layers)
            ]
        )
        self.norm = GemmaRMSNorm(D, config.rms_norm_eps, dtype=dtype)
        self.kinds = tuple(layer_types(config))
        self.window = config.sliding_window
        self.ring_pages = local_ring_pages(config)
        self.groups = [] if self.ring_pages else page_groups(self.kinds)
        # layer -> (page group, array it lies in)
        self.group_slot = {i: (g, j) for g, ls in enumerate(self.groups) for j, i in enumerate(ls)}
        H = head_dim(config)
        self.inv_freq = {
            kind: tuple(float(f) for f in inv_frequencies(H, rope_params(config, kind)))
            for kind in sorted(set(self.kinds))
        }

    def embed(self, input_ids: jax.Array) -> jax.Array:
        x = self.embed_tokens(input_ids)
        return x * jnp.asarray(self.embed_scale, x.dtype)

    def __call__(
        self, input_ids, kv_caches, md: AttentionMetadata, inputs_embeds=None, slots=None, **kw
    ):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (T, D)
        rotary = {
            kind: cos_sin(md.positions, jnp.asarray(np.array(f, np.float32)))
            for kind, f in self.inv_freq.items()
        }
        if self.groups:  # page groups over shared arrays (see the module doc)
            caches = list(kv_caches)
            mds = [
                dataclasses.replace(md, page_indices=md.page_indices[g])
                for g in range(len(self.groups))
            ]
            for i, (layer, kind) in enumerate(zip(self.layers, self.kinds)):
                g, j = self.group_slot[i]
                x, caches[j] = layer(x, *rotary[kind], caches[j], mds[g], **kw)
            return self.norm(x), caches
        if not self.ring_pages:  # every layer paged
            new_caches = []
            for layer, kind, kv_pages in zip(self.layers, self.kinds, kv_caches):
                x, kv_pages = layer(x, *rotary[kind], kv_pages, md, **kw)
                new_caches.append(kv_pages)
            return self.norm(x), new_caches

        # global layers paged (the first caches), local layers on their rings (the rest)
        n_global = self.kinds.count(FULL)
        paged, rings = list(kv_caches[:n_global]), list(kv_caches[n_global:])
        R, T = self.ring_pages, x.shape[0]
        if R * RING_PAGE < self.window + T - 1:
            raise ValueError(
                f"{LOCAL_KV_ENV}={R * RING_PAGE} holds fewer tokens than the sliding window "
                f"({self.window}) plus a step of {T} tokens needs: set it to at least "
                f"sliding_window + max_num_batched_tokens - 1 = {self.window + T - 1}"
            )
        G = paged[0].shape[3] if paged else RING_PAGE
        local_md = ring_metadata(md, slots, R, -(-md.page_indices.shape[1] * G // RING_PAGE))
        gi = li = 0
        for layer, kind in zip(self.layers, self.kinds):
            if kind == FULL:
                x, paged[gi] = layer(x, *rotary[kind], paged[gi], md, **kw)
                gi += 1
            else:
                Z = rings[li].shape[0]
                x, pages = layer(x, *rotary[kind], ring_as_pages(rings[li]), local_md, **kw)
                rings[li] = pages_as_ring(pages, Z)
                li += 1
        return self.norm(x), paged + rings


class Gemma3ForCausalLM(nnx.Module):
    # weights: HF keys that carry no parameter here
    ignored_hf_keys = (r"rotary_emb\.", r"embed_scale$")

    def __init__(self, config, *, dtype=jnp.float32, attention_backend: str = "reference", rngs):
        self.config = config
        self.model = Gemma3TextModel(
            config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        if not self.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs)
        self.final_soft_cap = getattr(config, "final_logit_softcapping", None)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.model.embed(input_ids)

    def __call__(
        self, input_ids, kv_caches, md: AttentionMetadata, inputs_embeds=None, seq_inputs=None,
        causal_end=None,
    ):  # fmt: skip
        slots = None
        if self.model.ring_pages:
            if seq_inputs is not None and "state_slot" in seq_inputs:
                slots = seq_inputs["state_slot"]
            else:  # no request in the step: every row uses the scratch slot
                slots = jnp.full(md.kv_lens.shape, kv_caches[-1].shape[0] - 1, jnp.int32)
        return self.model(input_ids, kv_caches, md, inputs_embeds, slots, causal_end=causal_end)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden (S, D) -> logits (S, V) in float32, soft-capped where the config says."""
        if self.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        logits = logits.astype(jnp.float32)
        if self.final_soft_cap:
            logits = self.final_soft_cap * jnp.tanh(logits / self.final_soft_cap)
        return logits

    def kv_cache_spec(self) -> tuple[int, int, int]:
        """(paged layers L, kv heads K, head dim H): the global layers only when the local
        layers keep rings."""
        c = self.config
        L = self.model.kinds.count(FULL) if self.model.ring_pages else c.num_hidden_layers
        if self.model.groups:  # as many arrays as the largest group has layers
            L = max(len(g) for g in self.model.groups)
        return L, c.num_key_value_heads, head_dim(c)

    def kv_cache_groups(self) -> list[tuple[int | None, tuple[int, ...]]]:
        """(sliding window or None, layer indices) per page group; one group when the layers
        are not grouped."""
        if not self.model.groups:
            return [(None, tuple(range(self.config.num_hidden_layers)))]
        return [
            (None if g == 0 else self.model.window, layers)
            for g, layers in enumerate(self.model.groups)
        ]

    def state_cache_spec(self, dtype) -> list[tuple[tuple[int, ...], jnp.dtype]]:
        """Per-slot (shape, dtype) of each local layer's ring, in layer order (none when off)."""
        if not self.model.ring_pages:
            return []
        c = self.config
        shape = (2, c.num_key_value_heads, self.model.ring_pages, RING_PAGE, head_dim(c))
        return [(shape, dtype)] * self.model.kinds.count(SLIDING)


# ---------------------------------------------------------------------------------------
# Gemma3ForConditionalGeneration


class Gemma3MultiModalProjector(nnx.Module):
    """SigLIP patches (B, P, Dv) -> average pool to `mm_tokens_per_image` -> Gemma RMSNorm ->
    (B, n, Dt) through one (Dv, Dt) matrix (HF stores it untransposed, as a raw parameter)."""

    def __init__(self, config, *, dtype):
        vc, Dt = config.vision_config, config.text_config.hidden_size
        self.mm_input_projection_weight = nnx.Param(jnp.zeros((vc.hidden_size, Dt), dtype=dtype))
        self.mm_soft_emb_norm = GemmaRMSNorm(vc.hidden_size, vc.layer_norm_eps, dtype=dtype)
        self.patches_per_side = vc.image_size // vc.patch_size
        self.tokens_per_side = int(config.mm_tokens_per_image**0.5)
        self.kernel = self.patches_per_side // self.tokens_per_side

    def __call__(self, x: jax.Array) -> jax.Array:
        B, _, Dv = x.shape
        p, t, k = self.patches_per_side, self.tokens_per_side, self.kernel
        # AvgPool2d(k, stride k) over the (p, p) patch grid; p = t * k for every Gemma 3
        grid = x.reshape(B, p, p, Dv)[:, : t * k, : t * k]
        pooled = grid.astype(jnp.float32).reshape(B, t, k, t, k, Dv).mean(axis=(2, 4))
        normed = self.mm_soft_emb_norm(pooled.astype(x.dtype).reshape(B, t * t, Dv))
        w = self.mm_input_projection_weight[...]
        return jnp.einsum("BnV,VD->BnD", normed, w).astype(x.dtype)


def language_config(config):
    """The text config, with tied embeddings resolved from both configs."""
    text_config = copy.copy(config.text_config)
    text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True)) or bool(
        getattr(text_config, "tie_word_embeddings", False)
    )
    return text_config


# Gemma3Processor's text around an image with pan-and-scan crops (`replace_image_token`)
PAN_AND_SCAN_LEAD = "Here is the original image "
PAN_AND_SCAN_CROPS = " and here are some crops to help you see better "


class Gemma3ForConditionalGeneration(FixedImageTokens, nnx.Module):
    is_multimodal = True
    mm_modalities = ("image",)
    uses_mrope = False
    # the scheduler never ends a prefill chunk inside an image (bidirectional attention)
    mm_whole_items = True
    # the prompt text of an image depends on its number of crops (`mm_expand_prompt_text`)
    mm_expand_with_items = True
    hf_key_rules = (
        (r"^model\.language_model\.", "language_model.model."),
        (r"^model\.vision_tower\.", "vision_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^lm_head\.", "language_model.lm_head."),
        *siglip.hf_key_rules("vision_tower"),
    )

    def __init__(self, config, *, dtype=jnp.float32, attention_backend: str = "reference", rngs):
        self.hf_config = config
        self.config = text_config = language_config(config)
        self.vision_tower = SiglipVisionModel(config.vision_config, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = Gemma3MultiModalProjector(config, dtype=dtype)
        self.language_model = Gemma3ForCausalLM(
            text_config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        ignored = [r"rotary_emb\.", r"embed_scale$", *siglip.ignored_hf_keys("vision_tower")]
        if text_config.tie_word_embeddings:
            ignored.append(r"^language_model\.lm_head\.weight$")
        self.ignored_hf_keys = tuple(ignored)
        self.image_token_id = int(config.image_token_id)
        self.backend = attention_backend
        self.dtype = dtype

    # -- the text path (what the runner's step calls) ----------------------------------------
    def embed(self, input_ids: jax.Array) -> jax.Array:
        # the image soft token may lie past the vocabulary (HF embeds it as id 0)
        ids = jnp.where(input_ids >= self.config.vocab_size, 0, input_ids)
        return self.language_model.embed(ids)

    def __call__(
        self, input_ids, kv_caches, md: AttentionMetadata, inputs_embeds=None, seq_inputs=None
    ):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        causal_end = image_causal_end(input_ids, md, self.image_token_id)
        lm = self.language_model
        if self.backend in ("reference", "xla"):  # the mask costs nothing there
            return lm(input_ids, kv_caches, md, inputs_embeds, seq_inputs, causal_end=causal_end)

        # kernels take no mask: a step with image tokens runs every layer on the XLA path,
        # other steps on the kernel; one branch per step (a per-layer cond would read the
        # predicate once per layer)
        def with_mask(caches):
            return lm(input_ids, caches, md, inputs_embeds, seq_inputs, causal_end=causal_end)

        def without_mask(caches):
            return lm(input_ids, caches, md, inputs_embeds, seq_inputs)

        return jax.lax.cond(jnp.any(causal_end >= 0), with_mask, without_mask, kv_caches)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        # transformers' Gemma3ForConditionalGeneration applies no final soft cap (only its
        # ForCausalLM does); released Gemma 3 configs set none anyway
        lm = self.language_model
        if lm.tie_word_embeddings:
            return lm.model.embed_tokens.attend(hidden).astype(jnp.float32)
        return lm.lm_head(hidden).astype(jnp.float32)

    def kv_cache_spec(self) -> tuple[int, int, int]:
        return self.language_model.kv_cache_spec()

    def kv_cache_groups(self) -> list[tuple[int | None, tuple[int, ...]]]:
        return self.language_model.kv_cache_groups()

    def state_cache_spec(self, dtype) -> list[tuple[tuple[int, ...], jnp.dtype]]:
        return self.language_model.state_cache_spec(dtype)

    # -- images --------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values (B, 3, S, S) -> projected features (B, n, D_text)."""
        states = self.vision_tower.last_hidden_state(pixel_values.astype(self.dtype))
        return self.multi_modal_projector(states)

    # -- the multimodal contract (plain Python; see llava.py's docstring) ---------------------
    def mm_token_id(self, modality: str) -> int:
        return self.image_token_id

    def mm_prompt_placeholder(self, modality: str) -> list[int]:
        """What a prompt holds where an image goes: `<start_of_image>` (boi)."""
        return [int(self.hf_config.boi_token_id)]

    def mm_expand_prompt_text(self, text: str, tokenizer, items: list | None = None) -> str:
        """Each `<start_of_image>` -> HF's full image sequence, before tokenizing (as
        Gemma3Processor does: the "\\n\\n" around it merge with neighbouring text).

        `items`: each image's processed data, prompt order. An image with pan-and-scan crops
        gets HF's text for it, with its span from the original's first soft token to the last
        crop's last one written as one soft token: the front end places the span
        (`mm_span_ids`) over it. Special tokens cut the text apart before tokenizing, so the
        text outside the span tokenizes as in HF's prompt."""
        boi = tokenizer.convert_ids_to_tokens(int(self.hf_config.boi_token_id))
        eoi = tokenizer.convert_ids_to_tokens(int(self.hf_config.eoi_token_id))
        soft = tokenizer.convert_ids_to_tokens(self.image_token_id)
        full = f"\n\n{boi}{soft * self._tokens_per_image()}{eoi}\n\n"
        crops = [_num_crops(it) for it in items or ()]
        if not any(crops):
            return text.replace(boi, full)
        parts = text.split(boi)
        out = [parts[0]]
        for k, part in enumerate(parts[1:]):
            if k < len(crops) and crops[k]:
                out.append(f"{PAN_AND_SCAN_LEAD}\n\n{boi}{soft}{eoi}\n\n")
            else:
                out.append(full)
            out.append(part)
        return "".join(out)

    def mm_span_ids(self, modality: str, item: dict, encode_text) -> list[int] | None:
        """An image with crops: its tokens from the original's first soft token to the last
        crop's last one (HF's text between them included); None without crops."""
        crops = _num_crops(item)
        if not crops:
            return None
        c = self.hf_config
        boi, eoi = int(c.boi_token_id), int(c.eoi_token_id)
        run = [self.image_token_id] * self._tokens_per_image()
        # the text between two runs lies between special tokens, which the tokenizer cuts
        # out first: alone it tokenizes as inside HF's prompt
        span = [*run, eoi, *encode_text(f"\n\n{PAN_AND_SCAN_CROPS}\n\n"), boi, *run]
        for _ in range(crops - 1):
            span += [eoi, *encode_text("\n\n \n\n"), boi, *run]
        return span

    def _tokens_per_image(self) -> int:
        return int(self.hf_config.mm_tokens_per_image)

    def mm_num_tokens(self, modality: str, item: dict) -> int:
        """Rows of an image: its soft tokens, or with crops its whole span (`mm_span_ids`)."""
        crops = _num_crops(item)
        if not crops:
            return super().mm_num_tokens(modality, item)
        vc = self.hf_config.vision_config
        want = (1 + crops, vc.num_channels, vc.image_size, vc.image_size)
        got = tuple(np.shape(item["pixel_values"]))
        if got != want:
            raise ValueError(
                f"an image with {crops} pan-and-scan crops has pixel values of shape {got}; "
                f"this model's vision tower takes {want} (the image, then its crops)"
            )
        if "span_ids" not in item:
            raise ValueError("an image with pan-and-scan crops needs its span (`mm_span_ids`)")
        return len(item["span_ids"])

    def mm_encoder(self, graphdef):
        """A host function (params, modality, items) -> [features (n, D_text) per item], left
        on the device (`DeviceRows`) for the runner to splice."""
        from jaxmm.models.encoder_jit import encoder_jit

        @encoder_jit
        def run(params, pixel_values):
            return nnx.merge(graphdef, params).get_image_features(pixel_values)

        @jax.jit
        def spread(params, flats, src, text_ids, is_image):
            """A span's rows: the tower's at its soft tokens, the text's embeddings elsewhere."""
            rows = jnp.concatenate(flats)  # (M, D_text)
            text = nnx.merge(graphdef, params).embed(text_ids).astype(rows.dtype)  # (L, D_text)
            return jnp.where(is_image[:, None], rows[src], text)

        def encode(params, modality: str, items: list[dict]) -> list[DeviceRows]:
            # every image of every item (the original, then its pan-and-scan crops) in one list
            images = []
            for it in items:
                px = np.asarray(it["pixel_values"], np.float32)
                images.extend(px.reshape(-1, *px.shape[-3:]))
            pixels = np.stack(images)
            flats, rows, base = [], [], []  # per call: flat rows; per image: rows, global row
            for i in range(0, len(pixels), MAX_IMAGES_PER_CALL):
                chunk = pixels[i : i + MAX_IMAGES_PER_CALL]
                B = 1 << max(0, (len(chunk) - 1).bit_length())  # one program per power of two
                padded = np.zeros((B, *chunk.shape[1:]), np.float32)
                padded[: len(chunk)] = chunk
                feats = run(params, padded)  # (B, n, D_text)
                n = feats.shape[1]
                flat = feats.reshape(-1, feats.shape[-1])
                offset = sum(len(f) for f in flats)
                flats.append(flat)
                rows.extend(DeviceRows(flat, j * n, (j + 1) * n) for j in range(len(chunk)))
                base.extend(offset + j * n for j in range(len(chunk)))
            out, k = [], 0
            for it in items:
                crops = _num_crops(it)
                if not crops:
                    out.append(rows[k])
                    k += 1
                    continue
                span = np.asarray(it["span_ids"], np.int32)
                # padded to a power of two of rows (at least 16): one program per size
                is_image = np.zeros(1 << max(4, (len(span) - 1).bit_length()), bool)
                ids = np.zeros(len(is_image), np.int32)
                ids[: len(span)] = span
                is_image[: len(span)] = span == self.image_token_id
                n = len(rows[k])
                src = np.zeros(len(ids), np.int32)  # image t's rows, one run after another
                src[is_image] = np.concatenate(
                    [base[k + t] + np.arange(n) for t in range(1 + crops)]
                )
                arr = spread(params, tuple(flats), src, np.where(is_image, 0, ids), is_image)
                out.append(DeviceRows(arr, 0, len(span)))
                k += 1 + crops
            return out

        return encode


def _num_crops(item) -> int:
    """Pan-and-scan crops of an item's processed data (0: none, or precomputed rows)."""
    return int(item.get("num_crops", 0) or 0) if isinstance(item, dict) else 0
