"""Paged decode attention (one query token per sequence) as Pallas kernels, Triton lowering.

Flash-decoding. A program takes one KV head k and a contiguous range of one sequence's live
KV blocks. It holds the g = N / K query heads that share KV head k as the rows of one tile,
so each K/V block is read from HBM once for the whole GQA group (rows padded to 16, the
smallest tensor-core tile; the padding rows are masked on load and store). Every step
gathers the pages of one BK-token block through the page table into a (BK, H) tile.

Two ways to cut the work into programs (`split_mode`):

- "per_seq" (default): the grid is (S, K, J); program (s, k, j) takes the j-th of J
  contiguous slices ("splits") of sequence s. J is static (it sizes the grid), picked from
  the batch shape so that S * K * J fills the GPU; split boundaries follow each sequence's own
  kv_len. With J = 1 the kernel writes its rows straight into the step's output buffer
  (aliased in and out; rows of other sequences are left alone). With J > 1 it writes
  unnormalised partials (o, running max m, sum l) that `combine_splits` merges in XLA.
  On random lengths the programs of short sequences finish at once while long ones straggle.
- "balanced": work items of about equal size. From the batch's total live blocks (on
  device) a chunk size `bps` is picked so that ~`num_programs` programs exist; sequence s
  gets c_s = cdiv(n_s, bps) work items (its blocks split evenly), sequences ordered by item
  size, largest first (`balance_work`, a few small XLA ops). The grid is (K, W) with W a
  static bound on the item count (sum c_s <= total / bps + S); program (k, w) finds its
  item by counting prefix sums <= w, and programs past the real work exit at once. A
  sequence with one item writes its rows straight into the output buffer; the others write
  partials that a second small kernel (`_combine_kernel`, grid (S, K)) merges into it.

Sequences s >= num_decodes (prefill chunks, padding) do nothing here.
"""

from __future__ import annotations

import dataclasses
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
SPLIT_MODES = ("per_seq", "balanced", "mosaic")  # "mosaic": decode_mgpu.py


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Decode-kernel choices a caller may pin; None leaves the shape-based plan's choice.

    split_mode: "per_seq" | "balanced" (module docstring). num_splits: J of "per_seq".
    block_k, num_warps, num_stages: the KV tile and the Triton launch. programs_per_core,
    min_blocks_per_split, longest_first: "balanced" only (target programs per SM, the
    smallest work item in KV blocks, item order).
    """

    split_mode: str | None = None
    num_splits: int | None = None
    block_k: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    programs_per_core: int | None = None
    min_blocks_per_split: int | None = None
    longest_first: bool | None = None

    def __post_init__(self):
        if self.split_mode is not None and self.split_mode not in SPLIT_MODES:
            raise ValueError(f"split_mode {self.split_mode!r} not in {SPLIT_MODES}")
        for f in ("num_splits", "block_k", "num_warps", "num_stages", "programs_per_core"):
            v = getattr(self, f)
            if v is not None and v < 1:
                raise ValueError(f"{f} must be >= 1, got {v}")
        if self.min_blocks_per_split is not None and self.min_blocks_per_split < 1:
            raise ValueError("min_blocks_per_split must be >= 1")


def floor_div(a, b):
    """Floor division of non-negative ints (plain `//` lowers to a sign-correcting sequence)."""
    return lax.div(a, jnp.asarray(b, jnp.int32))


def ceil_div(a, b):
    return lax.div(a + (b - 1), jnp.asarray(b, jnp.int32))


def log2_scores(q, k, sm_scale, soft_cap, precision):
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
        pidx = floor_div(tok, page_size)
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
    page = jnp.clip(pt_ref[seq, floor_div(block, per_page)], 0, A - 1)
    off = lax.rem(block, jnp.asarray(per_page, jnp.int32)) * block_k
    k = kv_ref[0, kv_head, page, pl.ds(off, block_k), :]
    v = kv_ref[1, kv_head, page, pl.ds(off, block_k), :]
    return k, v


def block_range(kv_len, sliding_window, block_k):
    """(lo, first block, block count) a decode query attends to; scalars in-kernel or arrays."""
    lo = 0 if sliding_window is None else jnp.maximum(kv_len - sliding_window, 0)
    b_lo = floor_div(lo, block_k)
    return lo, b_lo, ceil_div(kv_len, block_k) - b_lo


def _group_rows(kv_head, group, rows, head_dim):
    """The query heads of KV head `kv_head` as `rows` tile rows, and the mask of real ones."""
    row_ok = lax.broadcasted_iota(jnp.int32, (rows, head_dim), 0) < group
    return pl.ds(kv_head * group, rows), row_ok


def _attend(
    q_ref,
    kv_ref,
    pt_ref,
    s,
    kh,
    kv_len,
    lo,
    b0,
    b1,
    *,
    sm_scale,
    soft_cap,
    group,
    rows,
    page_size,
    block_k,
    precision,
    gather,
):
    """Flash loop of sequence s's query rows (KV head kh) over KV blocks [b0, b1): (o, m, l)."""
    H = q_ref.shape[2]
    heads, row_ok = _group_rows(kh, group, rows, H)
    if rows == group:
        q = q_ref[s, heads, :]
    else:
        q = plgpu.load(q_ref.at[s, heads, :], mask=row_ok, other=0.0)

    def body(b, carry):
        k, v = load_kv_block(
            kv_ref, pt_ref, s, kh, b, page_size=page_size, block_k=block_k, gather=gather
        )
        kpos = b * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        valid = (kpos < kv_len) & (kpos >= lo)
        sc = log2_scores(q, k, sm_scale, soft_cap, precision)
        sc = jnp.where(valid[None, :], sc, -jnp.inf)
        # Stale slots past kv_len may hold anything (NaN on purpose in tests): 0 * NaN = NaN.
        v = jnp.where(valid[:, None], v, jnp.zeros_like(v))
        return online_softmax_step(carry, sc, v, precision)

    o = jnp.zeros((rows, H), jnp.float32)
    m = jnp.full((rows,), M_INIT, jnp.float32)
    l = jnp.zeros((rows,), jnp.float32)
    return lax.fori_loop(b0, b1, body, (o, m, l))


def _store_rows(out_ref, s, kh, o, l, *, group, rows):
    """Normalise (o, l) and write sequence s's rows of KV head kh into out (T, N, H)."""
    heads, row_ok = _group_rows(kh, group, rows, o.shape[1])
    out = o / jnp.where(l == 0, 1.0, l)[:, None]
    plgpu.store(out_ref.at[s, heads, :], out.astype(out_ref.dtype), mask=row_ok)


def _store_partial(refs, item, kh, o, m, l, *, group, rows):
    """Write unnormalised partials at index tuple `item`: o (*item, N, H), m, l (*item, N)."""
    o_ref, m_ref, l_ref = refs
    heads, row_ok = _group_rows(kh, group, rows, o.shape[1])
    row1 = lax.broadcasted_iota(jnp.int32, (rows,), 0) < group
    plgpu.store(o_ref.at[(*item, heads, slice(None))], o, mask=row_ok)
    plgpu.store(m_ref.at[(*item, heads)], m, mask=row1)
    plgpu.store(l_ref.at[(*item, heads)], l, mask=row1)


def _decode_kernel(
    kv_lens_ref,  # (S,)
    num_dec_ref,  # (1,)
    pt_ref,  # (S, P)
    q_ref,  # (T, N, H)
    kv_ref,  # (2, K, A, G, H)
    *refs,
    sliding_window,
    num_splits,
    **kw,
):
    """split_mode="per_seq": program (s, kh, j) takes split j of sequence s."""
    s = pl.program_id(0)
    kh = pl.program_id(1)
    j = pl.program_id(2)
    block_k = kw["block_k"]

    @pl.when(s < num_dec_ref[0])
    def _():
        kv_len = kv_lens_ref[s]
        lo, b_lo, n_blocks = block_range(kv_len, sliding_window, block_k)
        per_split = ceil_div(n_blocks, num_splits)
        b0 = b_lo + j * per_split
        b1 = jnp.minimum(b0 + per_split, b_lo + n_blocks)
        o, m, l = _attend(q_ref, kv_ref, pt_ref, s, kh, kv_len, lo, b0, b1, **kw)
        rows = dict(group=kw["group"], rows=kw["rows"])
        if num_splits == 1:
            _, o_ref = refs  # (T, N, H), aliased with the input buffer
            _store_rows(o_ref, s, kh, o, l, **rows)
        else:
            _store_partial(refs, (j, s), kh, o, m, l, **rows)


def _balanced_kernel(
    meta_ref,  # (4, Sp): cum_end, order, count, kv_len; each by position in the item order
    pt_ref,  # (S, P)
    q_ref,  # (T, N, H)
    kv_ref,  # (2, K, A, G, H)
    _out_in,  # (T, N, H), aliased with out_ref
    out_ref,
    *partial_refs,  # o (W, N, H), m (W, N), l (W, N)
    num_seqs,
    sliding_window,
    **kw,
):
    """split_mode="balanced": program (kh, w) takes work item w (see `balance_work`)."""
    kh = pl.program_id(0)
    w = pl.program_id(1)
    block_k = kw["block_k"]
    # Position of w's sequence in the item order: how many sequences end at or before w.
    idx = jnp.sum((meta_ref[0, :] <= w).astype(jnp.int32))

    @pl.when(idx < num_seqs)
    def _():
        s = meta_ref[1, idx]
        count = meta_ref[2, idx]
        kv_len = meta_ref[3, idx]
        i = w - (meta_ref[0, idx] - count)  # which of the sequence's items
        lo, b_lo, n_blocks = block_range(kv_len, sliding_window, block_k)
        per_item = ceil_div(n_blocks, count)
        b0 = b_lo + i * per_item
        b1 = jnp.minimum(b0 + per_item, b_lo + n_blocks)
        o, m, l = _attend(q_ref, kv_ref, pt_ref, s, kh, kv_len, lo, b0, b1, **kw)
        rows = dict(group=kw["group"], rows=kw["rows"])

        @pl.when(count == 1)
        def _():
            _store_rows(out_ref, s, kh, o, l, **rows)

        @pl.when(count > 1)
        def _():
            _store_partial(partial_refs, (w,), kh, o, m, l, **rows)


def _combine_kernel(
    meta_ref,  # (4, Sp), as in _balanced_kernel
    o_ref,  # (W, N, H) f32
    m_ref,  # (W, N)
    l_ref,  # (W, N)
    _out_in,  # (T, N, H), aliased with out_ref
    out_ref,
    *,
    group,
    rows,
):
    """Merge the partials of a sequence with > 1 work item into its output rows."""
    idx = pl.program_id(0)
    kh = pl.program_id(1)
    count = meta_ref[2, idx]

    @pl.when(count > 1)
    def _():
        s = meta_ref[1, idx]
        end = meta_ref[0, idx]
        H = o_ref.shape[2]
        heads, row_ok = _group_rows(kh, group, rows, H)
        row1 = lax.broadcasted_iota(jnp.int32, (rows,), 0) < group

        def body(item, carry):
            acc, m_acc, l_acc = carry
            o = plgpu.load(o_ref.at[item, heads, :], mask=row_ok, other=0.0)
            m = plgpu.load(m_ref.at[item, heads], mask=row1, other=M_INIT)
            l = plgpu.load(l_ref.at[item, heads], mask=row1, other=0.0)
            m_new = jnp.maximum(m_acc, m)
            a = jnp.exp2(m_acc - m_new)
            b = jnp.exp2(m - m_new)
            return acc * a[:, None] + o * b[:, None], m_new, l_acc * a + l * b

        acc = jnp.zeros((rows, H), jnp.float32)
        m = jnp.full((rows,), M_INIT, jnp.float32)
        l = jnp.zeros((rows,), jnp.float32)
        acc, _, l = lax.fori_loop(end - count, end, body, (acc, m, l))
        _store_rows(out_ref, s, kh, acc, l, group=group, rows=rows)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_blocks: int, num_cores: int) -> int:
    """Static split count: enough programs for ~2 waves, each split >= 2 KV blocks."""
    want = pl.cdiv(2 * num_cores, max(num_seqs * num_kv_heads, 1))
    cap = max(max_blocks // 2, 1)
    n = 1
    while n < want and n * 2 <= cap:
        n *= 2
    return n


def num_work_items(num_seqs: int, max_blocks: int, target_items: int, min_blocks: int) -> int:
    """Static bound on the items `balance_work` makes: the "balanced" grid size W.

    With bps >= cdiv(total, target) or bps = min_blocks > total / target, every live
    sequence adds at most (n_s - 1) / bps + 1 items, so the sum stays below target + S.
    """
    return max(1, min(target_items + num_seqs, num_seqs * pl.cdiv(max_blocks, min_blocks)))


def balance_work(
    kv_lens,
    num_decodes,
    *,
    num_seqs: int,
    block_k: int,
    sliding_window: int | None,
    target_items: int,
    min_blocks: int,
    longest_first: bool,
):
    """Work items of "balanced" decode (XLA, a few tiny ops): meta (4, Sp) int32.

    bps = max(min_blocks, cdiv(total live blocks, target_items)) blocks per item; decode
    sequence s gets c_s = cdiv(n_s, bps) items, the others none. Rows, by position in the
    item order (longest item first, or sequence order): [0] cumulative item count (padded
    with int32 max to Sp = a power of two, for one vector load), [1] the sequence, [2] c_s,
    [3] kv_len.
    """
    S = num_seqs
    kv = kv_lens[:S]
    _, _, n = block_range(kv, sliding_window, block_k)
    n = jnp.where(jnp.arange(S) < num_decodes[0], n, 0)
    bps = jnp.maximum(ceil_div(jnp.sum(n), target_items), min_blocks)
    count = ceil_div(n, bps)
    if longest_first:
        size = ceil_div(n, jnp.maximum(count, 1))  # blocks per item of each sequence
        order = jnp.argsort(-size, stable=True).astype(jnp.int32)
        count, kv = count[order], kv[order]
    else:
        order = jnp.arange(S, dtype=jnp.int32)
    Sp = max(16, 1 << (S - 1).bit_length())
    big = jnp.iinfo(jnp.int32).max
    rows = [jnp.cumsum(count), order, count, kv]
    return jnp.stack(
        [
            jnp.pad(r.astype(jnp.int32), (0, Sp - S), constant_values=big if i == 0 else 0)
            for i, r in enumerate(rows)
        ]
    )


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
    split_mode: str = "per_seq",
    num_programs: int = 528,
    min_blocks_per_split: int = 2,
    longest_first: bool = True,
    interpret: bool = False,
):
    """Write decode rows s < num_decodes of `out` (sequence s's token is row s).

    split_mode="per_seq" uses num_splits; "balanced" aims at num_programs programs in all
    (e.g. 4 per SM), items of >= min_blocks_per_split KV blocks, longest first.
    """
    if split_mode not in ("per_seq", "balanced"):
        raise ValueError(f"split_mode {split_mode!r} not in ('per_seq', 'balanced')")
    T, N, H = q.shape
    K, G = kv_pages.shape[1], kv_pages.shape[3]
    P = page_table.shape[1]
    group = N // K
    R = max(16, 1 << (group - 1).bit_length())
    S_d = min(num_seqs, T)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    tile = dict(
        sm_scale=sm_scale,
        soft_cap=soft_cap,
        group=group,
        rows=R,
        page_size=G,
        block_k=block_k,
        precision=precision,
        gather=gather,
    )
    params = dict(
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )
    if split_mode == "balanced":
        target = pl.cdiv(num_programs, K)
        W = num_work_items(S_d, pl.cdiv(P * G, block_k), target, min_blocks_per_split)
        meta = balance_work(
            kv_lens,
            num_decodes,
            num_seqs=S_d,
            block_k=block_k,
            sliding_window=sliding_window,
            target_items=target,
            min_blocks=min_blocks_per_split,
            longest_first=longest_first,
        )
        kernel = functools.partial(
            _balanced_kernel, num_seqs=S_d, sliding_window=sliding_window, **tile
        )
        out, o, m, l = pl.pallas_call(
            kernel,
            # Triton launches k fastest: items go out largest first across all KV heads.
            grid=(K, W),
            out_shape=[
                jax.ShapeDtypeStruct(out.shape, out.dtype),
                jax.ShapeDtypeStruct((W, N, H), jnp.float32),
                jax.ShapeDtypeStruct((W, N), jnp.float32),
                jax.ShapeDtypeStruct((W, N), jnp.float32),
            ],
            input_output_aliases={4: 0},
            name="jaxmm_paged_decode_balanced",
            **params,
        )(meta, page_table, q, kv_pages, out)
        return pl.pallas_call(
            functools.partial(_combine_kernel, group=group, rows=R),
            grid=(S_d, K),
            out_shape=jax.ShapeDtypeStruct(out.shape, out.dtype),
            input_output_aliases={4: 0},
            name="jaxmm_paged_decode_combine",
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
            interpret=interpret,
        )(meta, o, m, l, out)

    kernel = functools.partial(
        _decode_kernel, sliding_window=sliding_window, num_splits=num_splits, **tile
    )
    params.update(grid=(S_d, K, num_splits), name="jaxmm_paged_decode")
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
