"""Paged decode attention (one query token per sequence) as a Pallas kernel, Triton lowering.

Flash-decoding: the grid is (S, K, J). Program (s, k, j) takes sequence s, KV head k and the
j-th of J contiguous slices ("splits") of that sequence's live KV blocks. It holds the
g = N / K query heads that share KV head k as the rows of one tile, so each K/V block is
read from HBM once for the whole GQA group (rows padded to 16, the smallest tensor-core
tile; the padding rows are masked on load and store). Every step gathers the pages of one
BK-token block through the page table into a (BK, H) tile.

J is static (it sizes the grid), picked from the batch shape so that S * K * J fills the
GPU; split boundaries follow each sequence's own kv_len, so short sequences don't leave
whole programs idle. With J = 1 the kernel writes its rows straight into the step's output
buffer (aliased in and out; rows of other sequences are left alone). With J > 1 it writes
unnormalised partials (o, running max m, sum l) that `combine_splits` merges in XLA.

Sequences s >= num_decodes (prefill chunks, padding) do nothing here.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
# Running max starts finite so a fully masked block gives exp2(-inf - m) = 0, never NaN.
M_INIT = -1e30


def _div(a, b):
    """Floor division of non-negative ints (plain `//` lowers to a sign-correcting sequence)."""
    return lax.div(a, jnp.asarray(b, jnp.int32))


def _cdiv(a, b):
    return lax.div(a + (b - 1), jnp.asarray(b, jnp.int32))


def _scores(q, k, sm_scale, soft_cap, precision):
    """q (R, H) . k (BK, H)^T -> f32 (R, BK) logits in the log2 domain."""
    s = lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s * (sm_scale / soft_cap))
        return s * LOG2E
    return s * (sm_scale * LOG2E)


def online_softmax_step(carry, sc, v, precision):
    """One flash step: fold scores sc (R, BK) and values v (BK, H) into (o, m, l)."""
    o, m, l = carry
    m_new = jnp.maximum(m, jnp.max(sc, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(sc - m_new[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    pv = lax.dot_general(
        p.astype(v.dtype),
        v,
        (((1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    return o * alpha[:, None] + pv, m_new, l


def load_kv_block(kv_ref, pt_ref, seq, kv_head, block, *, page_size, block_k, gather="page"):
    """Gather the (BK, H) keys and values of token block `block` of sequence `seq`.

    kv_ref: (2, K, A, G, H) pool; pt_ref: (S, P) page table. Entries are clamped into
    [0, A): stale entries past a sequence's pages must not fault (their slots are masked).
    gather="page": BK >= G loads whole pages as (BK/G, G, H) and merges the leading dims,
    BK < G slices one page. gather="token": one 2-D gather with a page and slot per row.
    """
    A = kv_ref.shape[2]
    P = pt_ref.shape[1]
    H = kv_ref.shape[-1]
    if gather == "token":
        tok = block * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        pidx = _div(tok, page_size)
        pages = plgpu.load(pt_ref.at[seq, pidx], mask=pidx < P, other=0)
        pages = jnp.clip(pages, 0, A - 1)[:, None]
        slots = lax.rem(tok, jnp.int32(page_size))[:, None]
        h = lax.broadcasted_iota(jnp.int32, (1, H), 1)
        k = kv_ref[0, kv_head, pages, slots, h]
        v = kv_ref[1, kv_head, pages, slots, h]
        return k, v
    if block_k >= page_size:
        ppb = block_k // page_size
        idx = block * ppb + lax.broadcasted_iota(jnp.int32, (ppb,), 0)
        pages = plgpu.load(pt_ref.at[seq, pl.ds(block * ppb, ppb)], mask=idx < P, other=0)
        pages = jnp.clip(pages, 0, A - 1)
        k = kv_ref[0, kv_head, pages]  # (ppb, G, H)
        v = kv_ref[1, kv_head, pages]
        return k.reshape(block_k, H), v.reshape(block_k, H)
    per_page = page_size // block_k
    page = jnp.clip(pt_ref[seq, _div(block, per_page)], 0, A - 1)
    off = lax.rem(block, jnp.asarray(per_page, jnp.int32)) * block_k
    k = kv_ref[0, kv_head, page, pl.ds(off, block_k), :]
    v = kv_ref[1, kv_head, page, pl.ds(off, block_k), :]
    return k, v


def _decode_kernel(
    kv_lens_ref,  # (S,)
    num_dec_ref,  # (1,)
    pt_ref,  # (S, P)
    q_ref,  # (T, N, H)
    kv_ref,  # (2, K, A, G, H)
    *refs,
    sm_scale,
    soft_cap,
    sliding_window,
    group,
    rows,
    page_size,
    block_k,
    num_splits,
    precision,
    gather,
):
    s = pl.program_id(0)
    kh = pl.program_id(1)
    j = pl.program_id(2)
    H = q_ref.shape[2]
    R = rows

    @pl.when(s < num_dec_ref[0])
    def _():
        kv_len = kv_lens_ref[s]
        lo = 0 if sliding_window is None else jnp.maximum(kv_len - sliding_window, 0)
        b_lo = _div(lo, block_k)
        n_blocks = _cdiv(kv_len, block_k) - b_lo
        per_split = _cdiv(n_blocks, num_splits)
        b0 = b_lo + j * per_split
        b1 = jnp.minimum(b0 + per_split, b_lo + n_blocks)

        row_ok = lax.broadcasted_iota(jnp.int32, (R, H), 0) < group
        heads = pl.ds(kh * group, R)
        if R == group:
            q = q_ref[s, heads, :]
        else:
            q = plgpu.load(q_ref.at[s, heads, :], mask=row_ok, other=0.0)

        def body(b, carry):
            k, v = load_kv_block(
                kv_ref, pt_ref, s, kh, b, page_size=page_size, block_k=block_k, gather=gather
            )
            kpos = b * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
            valid = (kpos < kv_len) & (kpos >= lo)
            sc = _scores(q, k, sm_scale, soft_cap, precision)
            sc = jnp.where(valid[None, :], sc, -jnp.inf)
            # Stale slots past kv_len may hold anything (NaN on purpose in tests): 0 * NaN = NaN.
            v = jnp.where(valid[:, None], v, jnp.zeros_like(v))
            return online_softmax_step(carry, sc, v, precision)

        o = jnp.zeros((R, H), jnp.float32)
        m = jnp.full((R,), M_INIT, jnp.float32)
        l = jnp.zeros((R,), jnp.float32)
        o, m, l = lax.fori_loop(b0, b1, body, (o, m, l))

        if num_splits == 1:
            _, o_ref = refs  # (T, N, H), aliased with the input buffer
            out = o / jnp.where(l == 0, 1.0, l)[:, None]
            plgpu.store(o_ref.at[s, heads, :], out.astype(o_ref.dtype), mask=row_ok)
        else:
            o_ref, m_ref, l_ref = refs
            row1 = lax.broadcasted_iota(jnp.int32, (R,), 0) < group
            plgpu.store(o_ref.at[j, s, heads, :], o, mask=row_ok)
            plgpu.store(m_ref.at[j, s, heads], m, mask=row1)
            plgpu.store(l_ref.at[j, s, heads], l, mask=row1)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_blocks: int, num_cores: int) -> int:
    """Static split count: enough programs for ~2 waves, each split >= 2 KV blocks."""
    want = pl.cdiv(2 * num_cores, max(num_seqs * num_kv_heads, 1))
    cap = max(max_blocks // 2, 1)
    n = 1
    while n < want and n * 2 <= cap:
        n *= 2
    return n


def decode_attention(
    q,  # (T, N, H)
    kv_pages,  # (2, K, A, G, H)
    kv_lens,  # (S,)
    page_table,  # (S, P)
    num_decodes,  # (1,)
    out,  # (T, N, H) the step's output so far; rows s < num_decodes get overwritten
    *,
    num_seqs: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    block_k: int,
    num_splits: int,
    num_warps: int = 4,
    num_stages: int = 2,
    gather: str = "page",
    interpret: bool = False,
):
    """Write decode rows s < num_decodes of `out` (sequence s's token is row s)."""
    T, N, H = q.shape
    K, G = kv_pages.shape[1], kv_pages.shape[3]
    group = N // K
    R = max(16, 1 << (group - 1).bit_length())
    S_d = min(num_seqs, T)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(
        _decode_kernel,
        sm_scale=sm_scale,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
        group=group,
        rows=R,
        page_size=G,
        block_k=block_k,
        num_splits=num_splits,
        precision=precision,
        gather=gather,
    )
    params = dict(
        grid=(S_d, K, num_splits),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxmm_paged_decode",
    )
    if num_splits == 1:
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(out.shape, out.dtype),
            input_output_aliases={5: 0},
            **params,
        )(kv_lens, num_decodes, page_table, q, kv_pages, out)
    o, m, l = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((num_splits, S_d, N, H), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, S_d, N), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, S_d, N), jnp.float32),
        ],
        **params,
    )(kv_lens, num_decodes, page_table, q, kv_pages)
    dec = combine_splits(o, m, l).astype(out.dtype)
    is_dec = (jnp.arange(S_d) < num_decodes[0])[:, None, None]
    return out.at[:S_d].set(jnp.where(is_dec, dec, out[:S_d]))


def combine_splits(o, m, l):
    """Merge J flash-decoding partials: o (J, ..., H) unnormalised, m/l (J, ...) log2 domain."""
    m_all = jnp.max(m, axis=0)
    w = jnp.exp2(m - m_all[None])
    denom = jnp.sum(w * l, axis=0)
    num = jnp.sum(w[..., None] * o, axis=0)
    return num / jnp.where(denom == 0, 1.0, denom)[..., None]
