"""Paged decode attention for Hopper GPUs: Pallas, Mosaic GPU lowering (split_mode="mosaic").

The work list is "balanced" decode's (`decode.balance_work`: items of about equal size,
longest first); a work item here is one of those items and one KV head. The grid is
persistent (one CTA per SM): CTA p takes items p, p + nprog, ... A CTA has two warpgroups:

- one memory warpgroup streams the item's query rows (a ring of two staging buffers) and
  its KV blocks (BK tokens) into a ring of `steps` shared-memory slots, one TMA copy per
  page, all of a block's copies completing one barrier. Both rings run on from one item to
  the next, so the next item's queries and first blocks load while the current one
  finishes;
- one compute warpgroup holds the item's g = N / K query heads as rows of a 64-row tile
  (one wgmma M tile; the other rows are zeros and never stored). Per block: S = Q K^T by
  wgmma, online softmax in registers (log2 domain), O += P V by wgmma.

Every item writes its unnormalised partial o (W, N, H) and (m, l) in columns 0 and 1 of
ml (W, N, H), f32 (the compute warpgroup waits only until a store has read its staging
buffer, never for the write to land); a small Triton kernel (`_combine_kernel`, grid
(S, K)) merges each sequence's items into the step's output rows (aliased in and out).

Slots past a sequence's kv_len may hold anything (NaN included): in the block that holds
kv_len, masked scores become -inf and the rows at or past it are zeroed in shared memory
before P V.

Interpret mode (CPU tests) runs the same program under Pallas' Mosaic GPU interpreter; the
two matmuls there are plain dots of the same shared-memory tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pltriton

from jaxmm.kernels.gpu import decode
from jaxmm.kernels.gpu.mgpu import LOG2E, M_INIT, bcast_rows, interpret_params, iota, with_layout

BQ = 64  # rows of the query tile (one wgmma M tile)


def supported(head_dim: int, page_size: int, group: int, block_k: int, dtype, window, cap):
    """Shapes and options this kernel takes."""
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim in (64, 128)
        and page_size % 8 == 0
        and block_k % page_size == 0
        and block_k in (64, 128)
        and group <= BQ
        and window is None
        and cap is None
    )


def item_table(meta, num_items: int, *, block_k: int):
    """Per work item w < num_items (static bound): (4, num_items) int32 seq, b0, b1, kv_len.

    meta: `decode.balance_work`'s (4, Sp) list (no sliding window here). Items past the
    real ones get b0 = b1 = 0.
    """
    cum, order, count, kv = meta
    w = jnp.arange(num_items, dtype=jnp.int32)
    idx = jnp.sum((cum[None, :] <= w[:, None]).astype(jnp.int32), axis=1)
    real = idx < jnp.sum((cum < jnp.iinfo(jnp.int32).max).astype(jnp.int32))
    idx = jnp.where(real, idx, 0)
    c = jnp.maximum(count[idx], 1)
    kv_len = kv[idx]
    n = (kv_len + block_k - 1) // block_k
    per = (n + c - 1) // c
    b0 = (w - (cum[idx] - c)) * per
    b1 = jnp.minimum(b0 + per, n)
    b0, b1 = jnp.where(real, b0, 0), jnp.where(real, b1, 0)
    return jnp.stack([order[idx], b0, b1, kv_len]).astype(jnp.int32)


def _kernel(
    items_ref,  # (4, W): seq, b0, b1, kv_len
    nitems_ref,  # (1,) real items
    pt_ref,  # (S, P)
    q_ref,  # (T, N, H)
    kv_ref,  # (2, K, A, G, H)
    o_ref,  # (W, N, H) f32 out
    ml_ref,  # (W, N, H) f32 out: m in column 0, l in column 1
    scoped,
    *,
    sm_scale: float,
    group: int,
    block_k: int,
    steps: int,
    interpret: bool,
):
    (q_st2, q_smem, o_st, k_smem, v_smem), (k_bar, v_bar, q_bar), frees = scoped
    k_free, v_free, q_free = frees
    K, A, G, H = kv_ref.shape[1], kv_ref.shape[2], kv_ref.shape[3], kv_ref.shape[4]
    P = pt_ref.shape[1]
    dtype = q_ref.dtype
    ppb = block_k // G
    pid = lax.axis_index("prog")
    nprog = lax.axis_size("prog")
    wg = lax.axis_index("wg")
    total = nitems_ref[0] * K
    my_items = lax.div(jnp.maximum(total - pid, 0) + (nprog - 1), nprog)
    c = sm_scale * LOG2E

    def slot_of(g):
        return lax.rem(g, jnp.int32(steps))

    def item(k):
        idx = k * nprog + pid  # items are longest first: w major, KV head minor
        w = lax.div(idx, jnp.int32(K))
        kh = lax.rem(idx, jnp.int32(K))
        return dict(
            w=w,
            kh=kh,
            seq=items_ref[0, w],
            b0=items_ref[1, w],
            n=items_ref[2, w] - items_ref[1, w],
            kv_len=items_ref[3, w],
        )

    @pl.when(wg == 0)
    def _compute():
        plgpu.set_max_registers(232, action="increase")

        def one_item(k, g):
            f = item(k)
            kv_len, n, b0 = f["kv_len"], f["n"], f["b0"]
            heads = pl.ds(f["kh"] * group, group)
            with jax.named_scope("q_in"):  # staged by the memory warpgroup
                qs = lax.rem(k, 2)
                q_st = q_st2.at[qs]
                plgpu.barrier_wait(q_bar.at[qs])
                row = iota((BQ, H), 0, interpret)
                if interpret:
                    qv = q_st[...]
                else:
                    qv = plgpu.load(q_st, (), layout=plgpu.Layout.WGMMA, optimized=False)
                plgpu.barrier_arrive(q_free.at[qs])
                q_smem[...] = jnp.where(row < group, qv, 0).astype(dtype)
                plgpu.commit_smem()

            rows = plgpu.Layout.WGMMA.reduce(1)
            m = with_layout(jnp.full((BQ,), M_INIT, jnp.float32), rows, interpret)
            l = with_layout(jnp.zeros((BQ,), jnp.float32), rows, interpret)
            acc = with_layout(jnp.zeros((BQ, H), jnp.float32), plgpu.Layout.WGMMA, interpret)
            n_full = jnp.clip(lax.div(kv_len, jnp.int32(block_k)) - b0, 0, n)

            @pl.when(n > 0)
            def _():
                plgpu.barrier_wait(k_bar.at[slot_of(g)])

            def step(j, carry, masked: bool):
                acc, m, l = carry
                slot = slot_of(g + j)
                k_slot, v_slot = k_smem.at[slot], v_smem.at[slot]
                if interpret:
                    s = lax.dot_general(
                        q_smem[...],
                        k_slot[...],
                        (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32,
                    )
                else:

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem, k_slot.transpose((1, 0)))
                        return acc_ref[...]

                    s = pl.run_scoped(qk, plgpu.ACC((BQ, block_k), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                base = (b0 + j) * block_k
                if masked:
                    kpos = iota((BQ, block_k), 1, interpret) + base
                    s = jnp.where(kpos < kv_len, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1) * c)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * c - bcast_rows(m_new, s.shape))
                acc = acc * bcast_rows(alpha, acc.shape)
                l = l * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                plgpu.barrier_wait(v_bar.at[slot])
                if masked:
                    rv = iota((block_k, H), 0, interpret)
                    v_slot[...] = jnp.where(rv + base < kv_len, v_slot[...], 0).astype(dtype)
                    plgpu.commit_smem()
                nxt = slot_of(g + j + 1)
                if interpret:
                    acc = acc + lax.dot_general(
                        p16,
                        v_slot[...],
                        (((1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32,
                    )

                    @pl.when(j + 1 < n)
                    def _():
                        plgpu.barrier_wait(k_bar.at[nxt])
                else:

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_slot)

                        @pl.when(j + 1 < n)
                        def _():
                            plgpu.barrier_wait(k_bar.at[nxt])

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            carry = (acc, m, l)
            carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
            acc, m, l = lax.fori_loop(n_full, n, functools.partial(step, masked=True), carry)

            with jax.named_scope("out"):  # waits only until a copy has read o_st
                dst = (f["w"], heads)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                o_st[...] = acc
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_st.at[pl.ds(0, group)], o_ref.at[dst])
                col = iota((BQ, H), 1, interpret)
                mb, lb = bcast_rows(m, (BQ, H)), bcast_rows(l, (BQ, H))
                ml = jnp.where(col == 0, mb, jnp.where(col == 1, lb, 0.0))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                o_st[...] = ml
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_st.at[pl.ds(0, group)], ml_ref.at[dst])
            return g + n

        lax.fori_loop(0, my_items, one_item, jnp.int32(0))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def one_item(k, g):
            f = item(k)
            seq, kh, b0 = f["seq"], f["kh"], f["b0"]
            qs = lax.rem(k, 2)

            @pl.when(k >= 2)
            def _():
                plgpu.barrier_wait(q_free.at[qs])

            plgpu.copy_gmem_to_smem(
                q_ref.at[seq, pl.ds(kh * group, group)],
                q_st2.at[qs, pl.ds(0, group)],
                q_bar.at[qs],
            )

            def block(j, g):
                slot = slot_of(g)
                pages = [
                    jnp.clip(pt_ref[seq, jnp.minimum((b0 + j) * ppb + i, P - 1)], 0, A - 1)
                    for i in range(ppb)
                ]
                for which, (buf, bar, free) in enumerate(
                    ((k_smem, k_bar, k_free), (v_smem, v_bar, v_free))
                ):

                    @pl.when(g >= steps)
                    def _(free=free):
                        plgpu.barrier_wait(free.at[slot])

                    for i, page in enumerate(pages):
                        plgpu.copy_gmem_to_smem(
                            kv_ref.at[which, kh, page], buf.at[slot, pl.ds(i * G, G)], bar.at[slot]
                        )
                return g + 1

            return lax.fori_loop(0, f["n"], block, g)

        g = lax.fori_loop(0, my_items, one_item, jnp.int32(0))

        @pl.loop(jnp.maximum(g - steps, 0), g)
        def _(j):  # the last releases: every waiter of a barrier sees all its phases
            plgpu.barrier_wait(k_free.at[slot_of(j)])
            plgpu.barrier_wait(v_free.at[slot_of(j)])

        @pl.loop(jnp.maximum(my_items - 2, 0), my_items)
        def _(k):
            plgpu.barrier_wait(q_free.at[lax.rem(k, 2)])


def _combine_kernel(
    meta_ref,  # (4, Sp) balance_work
    o_ref,  # (W, N, H) f32
    ml_ref,  # (W, N, H) f32
    _out_in,  # (T, N, H), aliased with out_ref
    out_ref,
    *,
    group,
    rows,
):
    """Merge sequence meta[1, idx]'s items into its output rows (KV head program_id(1))."""
    idx = pl.program_id(0)
    kh = pl.program_id(1)
    count = meta_ref[2, idx]

    @pl.when(count > 0)
    def _():
        s = meta_ref[1, idx]
        end = meta_ref[0, idx]
        H = o_ref.shape[2]
        heads = pl.ds(kh * group, rows)
        row_ok = lax.broadcasted_iota(jnp.int32, (rows, H), 0) < group
        row1 = lax.broadcasted_iota(jnp.int32, (rows,), 0) < group
        row_ok16 = lax.broadcasted_iota(jnp.int32, (rows, 16), 0) < group
        col16 = lax.broadcasted_iota(jnp.int32, (rows, 16), 1)

        def body(w, carry):
            acc, m_acc, l_acc = carry
            o = pltriton.load(o_ref.at[w, heads, :], mask=row_ok, other=0.0)
            ml = pltriton.load(ml_ref.at[w, heads, pl.ds(0, 16)], mask=row_ok16, other=0.0)
            m = jnp.where(row1, jnp.sum(jnp.where(col16 == 0, ml, 0.0), axis=1), M_INIT)
            l = jnp.sum(jnp.where(col16 == 1, ml, 0.0), axis=1)
            m_new = jnp.maximum(m_acc, m)
            a = jnp.exp2(m_acc - m_new)
            b = jnp.exp2(m - m_new)
            return acc * a[:, None] + o * b[:, None], m_new, l_acc * a + l * b

        acc = jnp.zeros((rows, H), jnp.float32)
        m = jnp.full((rows,), M_INIT, jnp.float32)
        l = jnp.zeros((rows,), jnp.float32)
        acc, _, l = lax.fori_loop(end - count, end, body, (acc, m, l))
        out = acc / jnp.where(l == 0, 1.0, l)[:, None]
        pltriton.store(out_ref.at[s, heads, :], out.astype(out_ref.dtype), mask=row_ok)


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
    block_k: int = 64,
    steps: int = 4,
    num_programs: int = 132,
    target_items: int = 132,
    min_blocks_per_split: int = 2,
    interpret: bool = False,
):
    """Write decode rows s < num_decodes of `out`, as `decode.decode_attention`.

    num_programs: the persistent grid; target_items: items per KV head (balance_work).
    """
    T, N, H = q.shape
    K, G = kv_pages.shape[1], kv_pages.shape[3]
    P = page_table.shape[1]
    group = N // K
    S_d = min(num_seqs, T)
    W = decode.num_work_items(S_d, pl.cdiv(P * G, block_k), target_items, min_blocks_per_split)
    meta = decode.balance_work(
        kv_lens,
        num_decodes,
        num_seqs=S_d,
        block_k=block_k,
        sliding_window=None,
        target_items=target_items,
        min_blocks=min_blocks_per_split,
        longest_first=True,
    )
    items = item_table(meta, W, block_k=block_k)
    nitems = meta[0, S_d - 1 : S_d]
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def entry(items_ref, nitems_ref, pt_ref, q_ref, kv_ref, o_ref, ml_ref):
        pl.run_scoped(
            lambda *scoped: _kernel(
                items_ref,
                nitems_ref,
                pt_ref,
                q_ref,
                kv_ref,
                o_ref,
                ml_ref,
                scoped,
                sm_scale=sm_scale,
                group=group,
                block_k=block_k,
                steps=steps,
                interpret=interpret,
            ),
            (
                plgpu.SMEM((2, BQ, H), q.dtype),
                plgpu.SMEM((BQ, H), q.dtype, transforms=tiled),
                plgpu.SMEM((BQ, H), jnp.float32),
                plgpu.SMEM((steps, block_k, H), q.dtype, transforms=tiled),
                plgpu.SMEM((steps, block_k, H), q.dtype, transforms=tiled),
            ),
            (
                plgpu.Barrier(num_arrivals=block_k // G, num_barriers=steps),
                plgpu.Barrier(num_arrivals=block_k // G, num_barriers=steps),
                plgpu.Barrier(num_barriers=2),
            ),
            (
                plgpu.Barrier(num_arrivals=1, num_barriers=steps),
                plgpu.Barrier(num_arrivals=1, num_barriers=steps),
                plgpu.Barrier(num_arrivals=1, num_barriers=2),
            ),
            collective_axes="wg",
        )

    o, ml = plgpu.kernel(
        entry,
        out_type=(
            jax.ShapeDtypeStruct((W, N, H), jnp.float32),
            jax.ShapeDtypeStruct((W, N, H), jnp.float32),
        ),
        grid=(num_programs,),
        grid_names=("prog",),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params() if interpret else None,
    )(items, nitems, page_table, q, kv_pages)
    R = max(16, 1 << (group - 1).bit_length())
    return pl.pallas_call(
        functools.partial(_combine_kernel, group=group, rows=R),
        grid=(S_d, K),
        out_shape=jax.ShapeDtypeStruct(out.shape, out.dtype),
        input_output_aliases={3: 0},
        name="jaxmm_paged_decode_mgpu_combine",
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
    )(meta, o, ml, out)
