"""Ragged paged attention as a Pallas TPU (Mosaic) kernel: the `reference` contract on TPU.

How one call runs:

1. KV write: this step's k, v go into the pages with an XLA scatter (`kv_write.write_kv_xla`),
   in place when the caller donates kv_pages (the model step does).
2. Layout: queries are regrouped by KV head, q (T, N, H) -> (K, T*g, H) with g = N // K, so
   row r of a query block is token r // g, head r % g of its group. One 2-D (R, H) tile then
   holds every query head that shares a KV head, and the kernel needs no reshape (a
   `ref.reshape` / `ref.bitcast` breaks TPU interpret mode: docs/tpu.md).
3. Grid (query block, KV head), both "parallel". A query block is `block_q` consecutive
   tokens of the flat ragged batch, so it may span several sequences (a block of decodes is
   many). Per block, XLA precomputes the range of live sequences it overlaps; that range,
   kv_lens, the flattened page table and cu_q_lens are scalar-prefetched into SMEM.
4. In the kernel, one loop walks (sequence, KV block) pairs for the block's sequences.
   A KV block is `block_kv` tokens = `block_kv // G` pages, each brought from HBM
   (`memory_space=ANY`) into VMEM by its own DMA; pages outside the visible range
   (past the last query's position, before the sliding window) are not fetched. The next
   pair's pages are fetched while this one computes (double buffer, two slots).
5. Online softmax in VMEM scratch (m, l lane-replicated (R, 128); acc (R, H) in f32). Rows
   of other sequences in the block are masked out of each update (their m, l, acc stay as
   they are), padding rows never match a sequence and come out as zeros. Stale VMEM and
   unwritten page slots may hold NaN: scores are masked with `where`, and V rows outside the
   visible range are zeroed before P.V.

Not done (TPU speed unmeasured: no TPU was available): prefetching the first KV block of
the next grid step, a separate small-row tile for decode-only blocks, int8/fp8 KV pages.
Runs on CPU in TPU interpret mode (`interpret=True` or a `pltpu.InterpretParams`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxmm.kernels import xla
from jaxmm.kernels.kv_write import write_kv_xla

LANES = 128
NEG = -1e30  # finite "minus infinity": a fully masked row keeps m = NEG and alpha = 1, no NaN


def _lanes(x, n: int):
    """(R, 128) lane-replicated -> (R, n): tile for n a multiple of 128, else a lane slice."""
    if n % LANES == 0:
        return jnp.tile(x, (1, n // LANES))
    if n < LANES:
        return x[:, :n]
    raise ValueError(f"width {n} neither < 128 nor a multiple of 128")


def _kernel(
    # scalar prefetch (SMEM)
    kv_lens_ref,  # (S,)
    pages_ref,  # (S * P,) flattened page table
    cu_ref,  # (S + 1,)
    seq_lo_ref,  # (NB,) first sequence overlapping each query block
    seq_hi_ref,  # (NB,) one past the last
    # inputs
    q_ref,  # (R, H) one query block of one KV head's group, R = block_q * g
    kv_hbm,  # (2, K, A, G, H) in HBM
    # output
    o_ref,  # (R, H)
    # scratch
    k_buf,  # (2, BK, H) double buffer
    v_buf,  # (2, BK, H)
    sems,  # DMA (2, 2): [k/v, slot]
    m_ref,  # (R, 128) f32
    l_ref,  # (R, 128) f32
    acc_ref,  # (R, H) f32
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    group: int,
    pages_per_seq: int,
    page_size: int,
):
    qb, kh = pl.program_id(0), pl.program_id(1)
    R, H = q_ref.shape
    BK = k_buf.shape[1]
    G, P = page_size, pages_per_seq
    ppb = BK // G  # pages per KV block
    blk_start = qb * (R // group)
    blk_end = blk_start + R // group
    seq_lo, seq_hi = seq_lo_ref[qb], seq_hi_ref[qb]
    num_seqs = kv_lens_ref.shape[0]

    m_ref[...] = jnp.full(m_ref.shape, NEG, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def seq_info(s):
        """Rows [r0, r1) of sequence s in this block; visible key positions [first, pos_hi]."""
        s = jnp.minimum(s, num_seqs - 1)  # a clamped read for the "next" of the last one
        c0, c1 = cu_ref[s], cu_ref[s + 1]
        off = kv_lens_ref[s] - c1  # position of token t is t + off (bottom-right aligned)
        r0 = jnp.maximum(c0, blk_start)
        r1 = jnp.minimum(c1, blk_end)
        pos_hi = r1 - 1 + off
        first = 0
        if sliding_window is not None:
            first = jnp.maximum(r0 + off - sliding_window + 1, 0)
        # lax.div (truncating) on values >= 0: `//` lowers through sign(), which Mosaic
        # lowers per TPU generation
        b_lo = lax.div(first, BK) if sliding_window is not None else jnp.int32(0)
        b_hi = lax.div(jnp.maximum(pos_hi, first), BK)
        return r0, r1, off, first, pos_hi, b_lo, b_hi

    def page_copies(s, b, slot):
        """(visible, make k/v copies) for each page of KV block b of sequence s."""
        _, _, _, first, pos_hi, _, _ = seq_info(s)
        out = []
        for i in range(ppb):
            j = b * ppb + i
            visible = (j * G <= pos_hi) & ((j + 1) * G > first)

            def copies(i=i, j=j):
                page = pages_ref[jnp.minimum(s, num_seqs - 1) * P + jnp.minimum(j, P - 1)]
                dst = pl.ds(i * G, G)
                return (
                    pltpu.make_async_copy(
                        kv_hbm.at[0, kh, page], k_buf.at[slot, dst], sems.at[0, slot]
                    ),
                    pltpu.make_async_copy(
                        kv_hbm.at[1, kh, page], v_buf.at[slot, dst], sems.at[1, slot]
                    ),
                )

            out.append((visible, copies))
        return out

    def start(s, b, slot):
        for visible, copies in page_copies(s, b, slot):

            @pl.when(visible)
            def _(copies=copies):
                for c in copies():
                    c.start()

    def wait(s, b, slot):
        for visible, copies in page_copies(s, b, slot):

            @pl.when(visible)
            def _(copies=copies):
                for c in copies():
                    c.wait()

    def compute(s, b, slot):
        r0, r1, off, first, pos_hi, _, _ = seq_info(s)
        k = k_buf[slot]  # (BK, H)
        v = v_buf[slot]
        q = q_ref[...]
        prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
        scores = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=prec
        )  # (R, BK)
        scores = scores * sm_scale
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        row = lax.broadcasted_iota(jnp.int32, (R, BK), 0)
        if group & (group - 1) == 0:  # power of two: a shift, not a vector integer division
            tok = blk_start + lax.shift_right_logical(row, group.bit_length() - 1)
        else:
            tok = blk_start + lax.div(row, group)
        kpos = b * BK + lax.broadcasted_iota(jnp.int32, (R, BK), 1)
        qpos = tok + off
        mask = (tok >= r0) & (tok < r1) & (kpos <= qpos)
        if sliding_window is not None:
            mask &= kpos > qpos - sliding_window
        scores = jnp.where(mask, scores, NEG)

        m_prev, l_prev = m_ref[...], l_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))  # (R, 128)
        p = jnp.where(mask, jnp.exp(scores - _lanes(m_next, BK)), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_next
        # Unfetched pages and unwritten slots may hold NaN; p = 0 there is not enough.
        vpos = b * BK + lax.broadcasted_iota(jnp.int32, (BK, H), 0)
        # (select in f32: older TPUs have no bf16 VPU ops)
        v = jnp.where((vpos >= first) & (vpos <= pos_hi), v.astype(jnp.float32), 0.0)
        v = v.astype(k.dtype)
        pv = lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
            precision=prec,
        )  # (R, H)
        acc_ref[...] = acc_ref[...] * _lanes(alpha, H) + pv

    def advance(s, b):
        """The (sequence, KV block) pair after (s, b)."""
        b_hi = seq_info(s)[6]
        nxt = seq_info(s + 1)[5]
        last = b >= b_hi
        return jnp.where(last, s + 1, s), jnp.where(last, nxt, b + 1)

    @pl.when(seq_lo < seq_hi)
    def _():
        b0 = seq_info(seq_lo)[5]
        start(seq_lo, b0, 0)

        def body(carry):
            s, b, slot = carry
            ns, nb = advance(s, b)

            @pl.when(ns < seq_hi)
            def _():
                start(ns, nb, 1 - slot)  # fetch the next pair while this one computes

            wait(s, b, slot)
            compute(s, b, slot)
            return ns, nb, 1 - slot

        lax.while_loop(lambda c: c[0] < seq_hi, body, (seq_lo, b0, jnp.int32(0)))

    l = _lanes(l_ref[...], H)
    o_ref[...] = (acc_ref[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def _block_sizes(T: int, g: int, G: int, block_q: int | None, block_kv: int | None):
    # ~128 query rows per tile (an MXU pass), a multiple of 16 tokens (bf16 sublane tiling);
    # never more than the batch itself.
    if block_q is None:
        block_q = max(16, (LANES // g) // 16 * 16)
        block_q = min(block_q, -(-T // 16) * 16)
    if block_kv is None:
        block_kv = max(G, LANES // G * G)  # 8 pages of 16 tokens: 128-lane score tiles
    if block_kv % G:
        raise ValueError(f"block_kv {block_kv} not a multiple of the page size {G}")
    return block_q, block_kv


def supported(q_shape, kv_pages_shape) -> bool:
    """Shapes the tiles take: head dim < 128 or a multiple of it, page size a multiple of 8."""
    H = q_shape[-1]
    G = kv_pages_shape[3]
    return (H < LANES or H % LANES == 0) and G % 8 == 0


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "interpret", "block_q", "block_kv"),
)
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
    interpret: bool | pltpu.InterpretParams = False,
    block_q: int | None = None,
    block_kv: int | None = None,
):
    """Pallas TPU ragged paged attention; see `reference.ragged_paged_attention`.

    `interpret`: True or a `pltpu.InterpretParams` runs the kernel in TPU interpret mode
    (any backend, e.g. the CPU tests). `block_q` (tokens) and `block_kv` (tokens, a multiple
    of the page size) override the tile sizes. Shapes the tiles don't take (`supported`)
    go to the XLA implementation.
    """
    T, N, H = q.shape
    _, K, A, G, _ = kv_pages.shape
    S, P = page_indices.shape
    if N % K:
        raise ValueError(f"query heads {N} not a multiple of KV heads {K}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError("sliding_window must be >= 1")
    if not supported(q.shape, kv_pages.shape):  # e.g. head dim 192: plain XLA instead
        return xla.ragged_paged_attention(
            q,
            k,
            v,
            kv_pages,
            kv_lens,
            page_indices,
            cu_q_lens,
            num_seqs,
            sm_scale=sm_scale,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
        )
    g = N // K
    bq, bk = _block_sizes(T, g, G, block_q, block_kv)
    if (bk < LANES and bk % 8) or (bk > LANES and bk % LANES) or bq % 8:
        raise ValueError(
            f"block_q {bq} must be a multiple of 8; block_kv {bk} a multiple of 8 below 128, "
            "else of 128"
        )

    kv_lens = kv_lens.astype(jnp.int32)
    page_indices = page_indices.astype(jnp.int32)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    num_seqs = num_seqs.astype(jnp.int32).reshape(1)
    kv_pages = write_kv_xla(k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)

    nb = -(-T // bq)
    Tp = nb * bq
    # q (T, N, H) -> (K, Tp * g, H): row t * g + i is token t, head kh * g + i.
    qk = jnp.pad(q, ((0, Tp - T), (0, 0), (0, 0)))
    qk = qk.reshape(Tp, K, g, H).transpose(1, 0, 2, 3).reshape(K, Tp * g, H)

    # Live sequences overlapping each query block: [seq_lo, seq_hi).
    starts = jnp.arange(nb, dtype=jnp.int32) * bq
    live = jnp.arange(S) < num_seqs[0]
    seq_lo = jnp.sum(live & (cu_q_lens[1:] <= starts[:, None]), axis=1, dtype=jnp.int32)
    seq_hi = jnp.sum(live & (cu_q_lens[:-1] < starts[:, None] + bq), axis=1, dtype=jnp.int32)

    R = bq * g
    q_spec = pl.BlockSpec((None, R, H), lambda i, h, *_: (h, i, 0))
    kernel = functools.partial(
        _kernel,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        group=g,
        pages_per_seq=P,
        page_size=G,
    )
    if interpret is True:
        interpret = pltpu.InterpretParams()
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(nb, K),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((2, bk, H), kv_pages.dtype),
                pltpu.VMEM((2, bk, H), kv_pages.dtype),
                pltpu.SemaphoreType.DMA((2, 2)),
                pltpu.VMEM((R, LANES), jnp.float32),
                pltpu.VMEM((R, LANES), jnp.float32),
                pltpu.VMEM((R, H), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(qk.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="jaxmm_tpu_ragged_paged_attention",
    )(kv_lens, page_indices.reshape(-1), cu_q_lens, seq_lo, seq_hi, qk, kv_pages)
    out = out.reshape(K, Tp, g, H).transpose(1, 0, 2, 3).reshape(Tp, N, H)[:T]
    return out, kv_pages
