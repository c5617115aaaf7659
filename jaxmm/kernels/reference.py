"""Pure-JAX ragged paged attention: the contract every kernel implements, and the test oracle.

The contract (docs/architecture.md, "Attention"):

    ragged_paged_attention(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                           *, sm_scale, sliding_window=None, soft_cap=None)
        -> (out, kv_pages)

    q:            (T, N, H)   queries of this step, sequences packed back to back
    k, v:         (T, K, H)   this step's new keys / values (written into the pages here)
    kv_pages:     (2, K, A, G, H)  one layer's KV pool (0 = keys, 1 = values)
    kv_lens:      (S,) int32  tokens in the cache for each sequence *after* this step
    page_indices: (S, P) int32 page table
    cu_q_lens:    (S+1,) int32 query offsets; sequence s owns q[cu_q_lens[s]:cu_q_lens[s+1]]
    num_seqs:     (1,) int32  live sequences; rows >= num_seqs and tokens >= cu_q_lens[num_seqs]
                              are padding (their output is zero, nothing is written for them)

Sequence s's new tokens sit at positions kv_lens[s] - q_len[s] ... kv_lens[s] - 1, so the
causal mask is aligned bottom-right: a prefill chunk sees all its earlier context.
Decodes (q_len 1) come first in the batch by convention, which kernels may exploit.
Sliding window w: a query at position p sees keys at positions > p - w.
Soft cap c: scores become c * tanh(scores / c) before masking.
causal_end (T,) int32, optional (reference and xla only): the last position each query may
see when that is past its own (-1: its own); a block of tokens computed in one step then
attends bidirectionally within itself (Gemma 3's image tokens). The sliding window still
counts back from the query's own position.
"""

from __future__ import annotations

import jax.numpy as jnp


def token_metadata(kv_lens, cu_q_lens, num_seqs, num_tokens: int):
    """Per-token (sequence id, position, valid) for a ragged batch. All (T,)."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    # seq id of token t: number of sequence ends <= t
    seq_ids = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
    n = num_seqs.reshape(())
    valid = t < cu_q_lens[n]
    seq_ids = jnp.where(valid, seq_ids, 0)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    pos = kv_lens[seq_ids] - q_lens[seq_ids] + (t - cu_q_lens[seq_ids])
    return seq_ids, jnp.where(valid, pos, 0), valid


def write_kv(k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs):
    """Scatter this step's k, v (T, K, H) into kv_pages (2, K, A, G, H). Padding is dropped."""
    T = k.shape[0]
    _, _, A, G, _ = kv_pages.shape
    seq_ids, pos, valid = token_metadata(kv_lens, cu_q_lens, num_seqs, T)
    page = page_indices[seq_ids, pos // G]
    page = jnp.where(valid, page, A)  # out of range -> dropped
    slot = pos % G
    kv = jnp.stack([k, v]).astype(kv_pages.dtype)  # (2, T, K, H)
    kv = jnp.swapaxes(kv, 1, 2)  # (2, K, T, H)
    return kv_pages.at[:, :, page, slot].set(kv, mode="drop")


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
):
    """Reference: write the new K/V, gather each token's sequence context, masked softmax.

    Memory is O(T * P * G): fine as an oracle and for small batches, not for speed.
    """
    T, N, H = q.shape
    _, K, A, G, _ = kv_pages.shape
    S, P = page_indices.shape
    kv_pages = write_kv(k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)

    seq_ids, pos, valid = token_metadata(kv_lens, cu_q_lens, num_seqs, T)
    # Gather per sequence (S, K, P*G, H), then pick each token's row.
    keys = kv_pages[0][:, page_indices]  # (K, S, P, G, H)
    vals = kv_pages[1][:, page_indices]
    keys = keys.reshape(K, S, P * G, H)
    vals = vals.reshape(K, S, P * G, H)

    group = N // K
    qg = q.reshape(T, K, group, H).astype(jnp.float32)
    k_tok = keys[:, seq_ids].astype(jnp.float32)  # (K, T, L, H)
    v_tok = vals[:, seq_ids].astype(jnp.float32)
    scores = jnp.einsum("TKgH,KTLH->TKgL", qg, k_tok) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    kpos = jnp.arange(P * G, dtype=jnp.int32)
    last = pos if causal_end is None else jnp.maximum(pos, causal_end)
    mask = kpos[None, :] <= last[:, None]  # causal, bottom-right aligned via absolute positions
    mask &= kpos[None, :] < kv_lens[seq_ids][:, None]
    if sliding_window is not None:
        mask &= kpos[None, :] > pos[:, None] - sliding_window
    mask &= valid[:, None]
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    # Fully masked rows (padding) -> zeros, never NaN: stale pages may hold NaN on purpose.
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask[:, None, None, :], jnp.exp(scores - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    v_tok = jnp.where(mask[None, :, :, None], v_tok, 0.0)  # keep NaN in unused slots out
    out = jnp.einsum("TKgL,KTLH->TKgH", p, v_tok) / jnp.where(denom == 0, 1.0, denom)
    out = out.reshape(T, N, H).astype(q.dtype)
    return out, kv_pages
