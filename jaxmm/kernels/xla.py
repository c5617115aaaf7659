"""Ragged paged attention in plain XLA, with work proportional to the real context length.

Same signature as `reference.ragged_paged_attention`. Two parts, merged by log-sum-exp:
1. this step's tokens attend to each other densely (T x T, masked to the same sequence
   and causal), using the new k/v directly;
2. each token attends to its sequence's cached context (positions before this step) in a
   `while_loop` over blocks of pages whose trip count is the longest context in the batch,
   so a short batch never touches the rest of the page table.
This is the default where no kernel is faster (CPU), and the fallback everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmm.kernels.reference import token_metadata, write_kv

PAGES_PER_ITER = 8


def _softcap(s, soft_cap):
    return s if soft_cap is None else soft_cap * jnp.tanh(s / soft_cap)


def ragged_paged_attention(
    q,
    k,
    v,
    kv_pages,
    kv_lens,
    page_indices,
    cu_q_lens,
    num_seqs,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    causal_end=None,
    pages_per_iter: int = PAGES_PER_ITER,
):
    T, N, H = q.shape
    _, K, A, G, _ = kv_pages.shape
    S, P = page_indices.shape
    g = N // K
    kv_pages = write_kv(k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    seq_ids, pos, valid = token_metadata(kv_lens, cu_q_lens, num_seqs, T)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    ctx = jnp.where(valid, (kv_lens - q_lens)[seq_ids], 0)  # (T,) cached tokens before the step

    qf = q.reshape(T, K, g, H).astype(jnp.float32)

    # 1. in-step part: (T, K, g, T)
    s = jnp.einsum("TKgH,UKH->TKgU", qf, k.astype(jnp.float32)) * sm_scale
    s = _softcap(s, soft_cap)
    # causal_end only reaches this step's own tokens: cached context is before every query
    last = pos if causal_end is None else jnp.maximum(pos, causal_end)
    mask = (seq_ids[:, None] == seq_ids[None, :]) & (pos[None, :] <= last[:, None])
    mask &= valid[:, None] & valid[None, :]
    if sliding_window is not None:
        mask &= pos[None, :] > pos[:, None] - sliding_window
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1)  # (T, K, g)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask[:, None, None, :], jnp.exp(s - m_safe[..., None]), 0.0)
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("TKgU,UKH->TKgH", p, v.astype(jnp.float32))

    # 2. cached context, page block by page block
    B = pages_per_iter
    pad = (-P) % B
    table = jnp.pad(page_indices, ((0, 0), (0, pad)))
    n_iter = (jnp.max(ctx) + B * G - 1) // (B * G)
    tok_pages_all = table[seq_ids]  # (T, P')

    def body(carry):
        j, m, l, o = carry
        pages = jax.lax.dynamic_slice_in_dim(tok_pages_all, j * B, B, axis=1)  # (T, B)
        kb = kv_pages[0][:, pages].reshape(K, T, B * G, H).astype(jnp.float32)
        vb = kv_pages[1][:, pages].reshape(K, T, B * G, H).astype(jnp.float32)
        kpos = j * B * G + jnp.arange(B * G, dtype=jnp.int32)
        bmask = kpos[None, :] < ctx[:, None]  # (T, L)
        if sliding_window is not None:
            bmask &= kpos[None, :] > pos[:, None] - sliding_window
        sb = jnp.einsum("TKgH,KTLH->TKgL", qf, kb) * sm_scale
        sb = _softcap(sb, soft_cap)
        sb = jnp.where(bmask[:, None, None, :], sb, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sb, axis=-1))
        m_new_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.where(jnp.isfinite(m), jnp.exp(m - m_new_safe), 0.0)
        pb = jnp.where(bmask[:, None, None, :], jnp.exp(sb - m_new_safe[..., None]), 0.0)
        vb = jnp.where(bmask[None, :, :, None], vb, 0.0)  # unused slots may hold NaN
        l = alpha * l + jnp.sum(pb, axis=-1)
        o = alpha[..., None] * o + jnp.einsum("TKgL,KTLH->TKgH", pb, vb)
        return j + 1, m_new, l, o

    _, m, l, o = jax.lax.while_loop(lambda c: c[0] < n_iter, body, (jnp.int32(0), m, l, o))
    out = o / jnp.where(l == 0, 1.0, l)[..., None]
    return out.reshape(T, N, H).astype(q.dtype), kv_pages
