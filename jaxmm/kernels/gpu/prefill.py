"""Paged prefill / mixed-batch attention as a Pallas kernel, Triton lowering.

FlashAttention-2 over a paged KV cache. The unit of work is one (query block, query head):
BQ consecutive query tokens of one sequence and one head, looping over that sequence's KV
blocks (pages gathered from the page table) with an online softmax.

Work list: the caller builds, in XLA, one entry per query block of every sequence this
kernel owns (all but the leading decodes), plus entries covering the padding tokens after
cu_q_lens[num_seqs] (they attend to nothing and so write zeros). How many entries exist is
only known on device, so the grid is persistent: a fixed number of programs (about two per
SM) strides over the (entry, head) items, heaviest entries (latest in their sequence, so the
most causal context) first. A batch of only decodes therefore costs one wave of programs
that exit at once, whatever T and S are.

Masks: the causal mask is aligned bottom-right by absolute position (query row r of an entry
sits at pos0 + r). KV blocks entirely at or below the first row's position need no mask
(phase 1); the diagonal blocks, and with a sliding window every block, are masked (phase 2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxmm.kernels.gpu.decode import (
    M_INIT,
    ceil_div,
    floor_div,
    load_kv_block,
    log2_scores,
    online_softmax_step,
)

# Rows of the work-list metadata (an int32 (5, W) array).
W_SEQ, W_T0, W_NROWS, W_POS0, W_KVHI = range(5)


def build_work_list(q_lens, kv_lens, cu_q_lens, num_seqs, owned, num_tokens, block_q, num_work):
    """Per query block: (seq, first token, valid rows, position of first row, key bound).

    owned: (S,) bool, sequences this kernel computes. Returns (meta (5, W) int32, count (1,)).
    Entries past `count` are unused (0 rows). Padding tokens form one extra pseudo-sequence
    with key bound 0, so their output is written as zeros.
    """
    S = q_lens.shape[0]
    n = num_seqs.reshape(())
    nb = jnp.where(owned, pl.cdiv(q_lens, block_q), 0)
    pad_start = cu_q_lens[n]
    nb_pad = pl.cdiv(num_tokens - pad_start, block_q)
    nb_all = jnp.concatenate([nb, nb_pad[None]])  # (S + 1,)
    ends = jnp.cumsum(nb_all)
    count = ends[-1]
    i = jnp.arange(num_work, dtype=jnp.int32)
    # owner = searchsorted(ends, i, "right"), as a compare-and-count: no XLA while loop
    owner = jnp.sum(ends[None, :] <= i[:, None], axis=1, dtype=jnp.int32)  # S = padding
    o = jnp.minimum(owner, S)
    blk = i - (ends[o] - nb_all[o])
    is_pad = owner == S
    so = jnp.minimum(owner, S - 1)
    seq_t0 = jnp.where(is_pad, pad_start, cu_q_lens[so])
    seq_tend = jnp.where(is_pad, num_tokens, cu_q_lens[so + 1])
    t0 = seq_t0 + blk * block_q
    nrows = jnp.clip(seq_tend - t0, 0, block_q)
    nrows = jnp.where(owner > S, 0, nrows)
    pos0 = jnp.where(is_pad, 0, kv_lens[so] - q_lens[so] + blk * block_q)
    kv_hi = jnp.where(is_pad, 0, pos0 + nrows)
    meta = jnp.stack([so, t0, nrows, pos0, kv_hi]).astype(jnp.int32)
    return meta, count.reshape(1).astype(jnp.int32)


def _prefill_kernel(
    meta_ref,  # (5, W)
    count_ref,  # (1,)
    pt_ref,  # (S, P')
    q_ref,  # (T, N, H)
    kv_ref,  # (2, K, A, G, H)
    o_ref,  # (T, N, H)
    *,
    sm_scale,
    soft_cap,
    sliding_window,
    group,
    page_size,
    block_q,
    block_k,
    precision,
    gather,
):
    T, N, H = q_ref.shape
    pid = pl.program_id(0)
    nprog = pl.num_programs(0)
    count = count_ref[0]
    n_items = count * N
    n_iter = lax.div(jnp.maximum(n_items - pid, 0) + nprog - 1, nprog)

    def item(it, _):
        idx = pid + it * nprog
        w = count - 1 - floor_div(idx, N)  # heaviest (last) blocks first
        head = lax.rem(idx, jnp.int32(N))
        kh = floor_div(head, group)
        seq = meta_ref[W_SEQ, w]
        t0 = meta_ref[W_T0, w]
        nrows = meta_ref[W_NROWS, w]
        pos0 = meta_ref[W_POS0, w]
        kv_hi = meta_ref[W_KVHI, w]

        rows = lax.broadcasted_iota(jnp.int32, (block_q, H), 0)
        q = plgpu.load(q_ref.at[pl.ds(t0, block_q), head, :], mask=rows < nrows, other=0.0)
        qpos = pos0 + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
        if sliding_window is None:
            lo = jnp.int32(0)
        else:
            lo = jnp.maximum(pos0 - sliding_window + 1, 0)
        b_lo = floor_div(lo, block_k)
        b_hi = ceil_div(kv_hi, block_k)
        # Blocks whose every key is <= pos0 are visible to all rows: no mask.
        b_full = floor_div(pos0 + 1, block_k) if sliding_window is None else b_lo
        b_full = jnp.clip(b_full, b_lo, b_hi)

        def step(b, carry, masked):
            k, v = load_kv_block(
                kv_ref, pt_ref, seq, kh, b, page_size=page_size, block_k=block_k, gather=gather
            )
            sc = log2_scores(q, k, sm_scale, soft_cap, precision)
            if masked:
                kpos = b * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
                mask = kpos[None, :] <= qpos[:, None]
                if sliding_window is not None:
                    mask &= kpos[None, :] > qpos[:, None] - sliding_window
                sc = jnp.where(mask, sc, -jnp.inf)
                # Keys past the last query, or before the window, may be stale or NaN.
                v = jnp.where(((kpos < kv_hi) & (kpos >= lo))[:, None], v, jnp.zeros_like(v))
            return online_softmax_step(carry, sc, v, precision)

        carry = (
            jnp.zeros((block_q, H), jnp.float32),
            jnp.full((block_q,), M_INIT, jnp.float32),
            jnp.zeros((block_q,), jnp.float32),
        )
        carry = lax.fori_loop(b_lo, b_full, functools.partial(step, masked=False), carry)
        o, m, l = lax.fori_loop(b_full, b_hi, functools.partial(step, masked=True), carry)
        out = o / jnp.where(l == 0, 1.0, l)[:, None]
        plgpu.store(
            o_ref.at[pl.ds(t0, block_q), head, :], out.astype(o_ref.dtype), mask=rows < nrows
        )
        return None

    lax.fori_loop(0, n_iter, item, None)


def prefill_attention(
    q,  # (T, N, H)
    kv_pages,  # (2, K, A, G, H)
    page_table,  # (S, P') clipped and padded
    meta,  # (5, W)
    count,  # (1,)
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    block_q: int,
    block_k: int,
    num_programs: int,
    num_warps: int = 4,
    num_stages: int = 2,
    gather: str = "page",
    interpret: bool = False,
):
    """(T, N, H) output for every token the work list covers; other rows are unspecified."""
    T, N, H = q.shape
    K, G = kv_pages.shape[1], kv_pages.shape[3]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(
        _prefill_kernel,
        sm_scale=sm_scale,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
        group=N // K,
        page_size=G,
        block_q=block_q,
        block_k=block_k,
        precision=precision,
        gather=gather,
    )
    return pl.pallas_call(
        kernel,
        grid=(num_programs,),
        out_shape=jax.ShapeDtypeStruct((T, N, H), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxmm_paged_prefill",
    )(meta, count, page_table, q, kv_pages)
