"""Paged attention as every model calls it, and the step metadata that drives it.

Models call `paged_attention(q, k, v, kv_pages, md, ...)`; which implementation runs
(pure-JAX reference, our Pallas kernel, ...) is fixed when the model is built, by the one
attention-backend switch (`jaxmm.kernels.ATTENTION_BACKENDS`, `jaxmm.kernels.backends`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmm.kernels import backends


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    """Fixed-shape description of one step's ragged batch (padded to its bucket)."""

    positions: jax.Array  # (T,) int32 position of each token (or (3, T) for M-RoPE)
    kv_lens: jax.Array  # (S,) int32 cached tokens after this step
    page_indices: jax.Array  # (S, P) int32
    cu_q_lens: jax.Array  # (S+1,) int32
    num_seqs: jax.Array  # (1,) int32
    logits_indices: jax.Array  # (S,) int32 token whose logits each sequence samples from


def resolve_backend(name: str) -> str:
    """A name from `jaxmm.kernels.ATTENTION_BACKENDS` -> the concrete backend here ("auto"
    resolved; see `jaxmm.kernels.backends.resolve`)."""
    return backends.resolve(name)


def paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_pages: jax.Array,
    md: AttentionMetadata,
    *,
    sm_scale: float,
    backend: str = "reference",
    sliding_window: int | None = None,
    soft_cap: float | None = None,
):
    """q (T, N, H), k/v (T, K, H), kv_pages (2, K, A, G, H) -> out (T, N, H), kv_pages."""
    fn = backends.attention_fn(backend)
    return fn(
        q,
        k,
        v,
        kv_pages,
        md.kv_lens,
        md.page_indices,
        md.cu_q_lens,
        md.num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )


def dense_attention(q, k, v, *, causal: bool, sm_scale: float, segment_ids=None, bias=None):
    """Encoder attention (ViT, Whisper): q (B, C, N, H), k/v (B, C, K, H)."""
    del segment_ids
    scores = jnp.einsum("BqNH,BkNH->BNqk", q.astype(jnp.float32), k.astype(jnp.float32))
    scores = scores * sm_scale
    if bias is not None:
        scores = scores + bias
    if causal:
        qn, kn = scores.shape[-2:]
        mask = jnp.tril(jnp.ones((qn, kn), bool), kn - qn)
        scores = jnp.where(mask, scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("BNqk,BkNH->BqNH", p, v.astype(jnp.float32)).astype(q.dtype)
