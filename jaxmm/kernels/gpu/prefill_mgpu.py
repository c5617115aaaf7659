"""Paged prefill / mixed-batch attention for Hopper GPUs: Pallas, Mosaic GPU lowering.

The same contract as `prefill.prefill_attention` (and the same work list), written for
the H100's asynchronous units: TMA copies, wgmma and warp specialisation.

A work item is one work entry (up to ROWS = 128 query tokens of one sequence) and one query
head. The grid is persistent (one CTA per SM); items go out in rounds of one per CTA,
latest entries first (most causal context), in snake order (round r gives CTA p the p-th
item of the round, or the p-th from the round's end when r is odd, so each CTA's total
evens out); the query heads of an entry sit next to each other (they share KV blocks
through L2). A batch of only decodes costs one wave of CTAs that exit at once.
A CTA has three warpgroups:

- two compute warpgroups of BQ = 64 query rows each. Per KV block: S = Q K^T by wgmma (f32
  accumulator), online softmax in registers (log2 domain), O += P V by wgmma. A shared
  "schedule" barrier makes the two take turns on the tensor cores (one's softmax overlaps the
  other's matmuls);
- one memory warpgroup that streams the sequence's KV blocks (BK = 128 tokens) into a ring
  of `STEPS_IN_FLIGHT` shared-memory slots: one TMA copy per page (G tokens), all of a
  block's copies completing one barrier. It reuses a slot once both compute warpgroups have
  released it; the ring runs on from one item to the next, so the next item's first blocks
  load while the current one finishes.

Masks are the bottom-right causal mask by absolute position, plus the key bound (kv_hi):
blocks entirely at or below a warpgroup's first row run unmasked; the rest are masked. Slots
past a sequence's kv_len may hold anything (NaN included): masked scores become -inf, and in
the block that holds kv_hi the rows at or past it are zeroed in shared memory before P V
(0 * NaN would be NaN).

Query rows come in, and output rows go out, through an untiled staging buffer (TMA copies
into a tiled buffer need a source row offset that is a multiple of 8; a sequence's tokens
start anywhere). Output: a warpgroup with r < 64
valid rows stores whole 8-row chunks, then single rows (`_store_rows`), so rows of the next
sequence are never touched.

Interpret mode (CPU tests) runs the same program under Pallas' Mosaic GPU interpreter, with
one difference: the interpreter has no transposed or register operands for wgmma, so there
the two matmuls are plain dots of the same shared-memory tiles.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxmm.kernels.gpu.mgpu import LOG2E, M_INIT, bcast_rows, interpret_params, iota, with_layout
from jaxmm.kernels.gpu.prefill import W_KVHI, W_NROWS, W_POS0, W_SEQ, W_T0

BQ = 64  # query rows per compute warpgroup (one wgmma M tile)
COMPUTE_WGS = 2
ROWS = BQ * COMPUTE_WGS  # query rows per work entry
BLOCK_K = 128
STEPS_IN_FLIGHT = 2


def supported(head_dim: int, page_size: int, dtype, sliding_window, soft_cap) -> bool:
    """Shapes and options this kernel takes (others go to the Triton kernel)."""
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim in (64, 128)
        and page_size % 8 == 0
        and BLOCK_K % page_size == 0
        and sliding_window is None
        and soft_cap is None
    )


def _store_rows(o_smem, out_ref, t, head, valid):
    """Rows [0, valid) of o_smem (BQ, H) -> out[t : t + valid, head], by TMA.

    Shared-memory offsets of a copy must be static: a full tile is one copy, otherwise
    whole 8-row chunks, then single rows.
    """

    def copy(lo, n):
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(lo, n)], out_ref.at[pl.ds(t + lo, n), head])

    @pl.when(valid == BQ)
    def _():
        copy(0, BQ)

    @pl.when(valid < BQ)
    def _():
        for c in range(BQ // 8):
            pl.when((c + 1) * 8 <= valid)(functools.partial(copy, c * 8, 8))
        tail = lax.div(valid, jnp.int32(8)) * 8
        for r in range(BQ):
            pl.when((r >= tail) & (r < valid))(functools.partial(copy, r, 1))


def _kernel(
    meta_ref,  # (5, W) int32 work list (prefill.build_work_list)
    count_ref,  # (1,) entries in use
    pt_ref,  # (S, P) page table
    q_ref,  # (T, N, H)
    kv_ref,  # (2, K, A, G, H)
    out_ref,  # (T, N, H)
    scoped,
    *,
    sm_scale: float,
    group: int,
    interpret: bool,
):
    (q_smem2, o_smem2, k_smem, v_smem), (k_bar, v_bar, q_bar), (k_free, v_free), sched = scoped
    A, G, H = kv_ref.shape[2], kv_ref.shape[3], kv_ref.shape[4]
    N = q_ref.shape[1]
    P = pt_ref.shape[1]
    dtype = q_ref.dtype
    ppb = BLOCK_K // G  # pages per KV block
    pid = lax.axis_index("prog")
    nprog = lax.axis_size("prog")
    wg = lax.axis_index("wg")
    n_items = count_ref[0] * N
    full, rest = lax.div(n_items, nprog), lax.rem(n_items, nprog)
    last_pos = jnp.where(lax.rem(full, 2) == 0, pid, nprog - 1 - pid)  # position in round `full`
    my_items = full + (last_pos < rest).astype(jnp.int32)
    c = sm_scale * LOG2E  # scores in the log2 domain

    def slot_of(g):
        return lax.rem(g, jnp.int32(STEPS_IN_FLIGHT))

    def item(k):
        """Work item k of this program: its entry's fields and its query and KV heads."""
        # snake order: even rounds give CTA p the p-th item, odd rounds the p-th from the end,
        # so the heavy-first costs even out over the CTAs
        idx = k * nprog + jnp.where(lax.rem(k, 2) == 0, pid, nprog - 1 - pid)
        rank = lax.div(idx, jnp.int32(N))
        # latest entries first: they carry the most causal context
        e = count_ref[0] - 1 - rank
        head = lax.rem(idx, jnp.int32(N))
        f = {n: meta_ref[r, e] for n, r in (("seq", W_SEQ), ("t0", W_T0), ("nrows", W_NROWS))}
        f.update(pos0=meta_ref[W_POS0, e], kv_hi=meta_ref[W_KVHI, e], head=head)
        f["kh"] = lax.div(head, jnp.int32(group))
        f["total"] = num_steps(f, BQ * (COMPUTE_WGS - 1))  # the last warpgroup needs most
        return f

    def num_steps(f, first_row):  # KV blocks the rows [first_row, first_row + BQ) need
        end = jnp.minimum(f["kv_hi"], f["pos0"] + first_row + BQ)
        return lax.div(jnp.maximum(end, 0) + (BLOCK_K - 1), jnp.int32(BLOCK_K))

    def schedule():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    # The ring of KV slots runs on across items: global block counter g, slot g % STEPS.

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smem = q_smem2.at[wg]
        o_smem = o_smem2.at[wg]
        row0 = wg * BQ

        def one_item(k, g):
            f = item(k)
            kv_hi, head, total = f["kv_hi"], f["head"], f["total"]
            qpos = f["pos0"] + row0  # absolute position of this warpgroup's first row
            n_steps = num_steps(f, row0)
            n_full = jnp.minimum(n_steps, lax.div(jnp.maximum(qpos + 1, 0), jnp.int32(BLOCK_K)))
            # A tiled tile's rows must start at a multiple of 8 in the source; a sequence's
            # tokens start anywhere. So the rows land in the untiled staging buffer first.
            with jax.named_scope("q_in"):
                plgpu.copy_gmem_to_smem(
                    q_ref.at[pl.ds(f["t0"] + row0, BQ), head], o_smem, q_bar.at[wg]
                )
                plgpu.barrier_wait(q_bar.at[wg])
                if interpret:
                    q_smem[...] = o_smem[...]
                else:
                    q_smem[...] = plgpu.load(o_smem, (), layout=plgpu.Layout.WGMMA, optimized=False)
                plgpu.commit_smem()

            rows = plgpu.Layout.WGMMA.reduce(1)
            m = with_layout(jnp.full((BQ,), M_INIT, jnp.float32), rows, interpret)
            l = with_layout(jnp.zeros((BQ,), jnp.float32), rows, interpret)
            acc = with_layout(jnp.zeros((BQ, H), jnp.float32), plgpu.Layout.WGMMA, interpret)

            @pl.when(n_steps > 0)
            def _():
                plgpu.barrier_wait(k_bar.at[slot_of(g)])

            pl.when(wg == 1)(schedule)

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
                    schedule()
                else:

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem, k_slot.transpose((1, 0)))
                        schedule()
                        return acc_ref[...]

                    with jax.named_scope("qk"):
                        s = pl.run_scoped(qk, plgpu.ACC((BQ, BLOCK_K), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    r = iota((BQ, BLOCK_K), 0, interpret)
                    kpos = iota((BQ, BLOCK_K), 1, interpret) + j * BLOCK_K
                    s = jnp.where((kpos <= r + qpos) & (kpos < kv_hi), s, -jnp.inf)
                # scale folded into the max and the exponent (one FMA per score)
                m_new = jnp.maximum(m, s.max(axis=1) * c)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * c - bcast_rows(m_new, s.shape))
                acc = acc * bcast_rows(alpha, acc.shape)
                l = l * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                plgpu.barrier_arrive(sched)  # softmax done
                with jax.named_scope("wait_v"):
                    plgpu.barrier_wait(v_bar.at[slot])
                with jax.named_scope("wait_tc"):
                    plgpu.barrier_wait(sched)  # the tensor cores are free
                if masked:

                    @pl.when((j + 1) * BLOCK_K > kv_hi)
                    def _():  # rows at or past kv_hi: stale slots, maybe NaN
                        rv = iota((BLOCK_K, H), 0, interpret)
                        v_slot[...] = jnp.where(rv + j * BLOCK_K < kv_hi, v_slot[...], 0).astype(
                            dtype
                        )
                        plgpu.commit_smem()

                nxt_slot = slot_of(g + j + 1)
                if interpret:
                    acc = acc + lax.dot_general(
                        p16,
                        v_slot[...],
                        (((1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32,
                    )

                    @pl.when(j + 1 < n_steps)
                    def _():
                        plgpu.barrier_wait(k_bar.at[nxt_slot])
                else:

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_slot)

                        @pl.when(j + 1 < n_steps)
                        def _():
                            plgpu.barrier_wait(k_bar.at[nxt_slot])

                    with jax.named_scope("pv_wait_k"):
                        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            def release(j, _):  # blocks only the other warpgroup needs
                slot = slot_of(g + j)
                # Wait for them anyway: every waiter of a barrier sees all its phases.
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                schedule()
                schedule()

            carry = (acc, m, l)
            carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
            carry = lax.fori_loop(n_full, n_steps, functools.partial(step, masked=True), carry)
            lax.fori_loop(n_steps, total, release, None)
            pl.when(wg == 0)(schedule)
            acc, m, l = carry

            with jax.named_scope("out"):
                l = jnp.where(l == 0.0, 1.0, l)  # no keys (padding rows): write zeros
                o_smem[...] = (acc / bcast_rows(l, acc.shape)).astype(dtype)
                plgpu.commit_smem()
                valid = jnp.clip(f["nrows"] - row0, 0, BQ)
                _store_rows(o_smem, out_ref, f["t0"] + row0, head, valid)
                plgpu.wait_smem_to_gmem(0)  # o_smem stages the next item's queries
            return g + total

        lax.fori_loop(0, my_items, one_item, jnp.int32(0))

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def one_item(k, g):
            f = item(k)
            seq, kh = f["seq"], f["kh"]

            def pages_of(j):  # stale entries clamped (their rows are masked)
                return tuple(
                    jnp.clip(pt_ref[seq, jnp.minimum(j * ppb + i, P - 1)], 0, A - 1)
                    for i in range(ppb)
                )

            def block(j, carry):
                g, pages = carry
                with jax.named_scope("pages"):  # the next block's, loading while this one waits
                    nxt = pages_of(j + 1)
                slot = slot_of(g)
                for which, (buf, bar, free) in enumerate(
                    ((k_smem, k_bar, k_free), (v_smem, v_bar, v_free))
                ):

                    @pl.when(g >= STEPS_IN_FLIGHT)
                    def _(free=free):
                        with jax.named_scope("wait_free"):
                            plgpu.barrier_wait(free.at[slot])

                    with jax.named_scope("tma"):
                        for i, page in enumerate(pages):
                            plgpu.copy_gmem_to_smem(
                                kv_ref.at[which, kh, page],
                                buf.at[slot, pl.ds(i * G, G)],
                                bar.at[slot],
                            )
                return g + 1, nxt

            g, _ = lax.fori_loop(0, f["total"], block, (g, pages_of(0)))
            return g

        g = lax.fori_loop(0, my_items, one_item, jnp.int32(0))

        @pl.loop(jnp.maximum(g - STEPS_IN_FLIGHT, 0), g)
        def _(j):  # the last releases: every waiter of a barrier sees all its phases
            plgpu.barrier_wait(k_free.at[slot_of(j)])
            plgpu.barrier_wait(v_free.at[slot_of(j)])


def prefill_attention(
    q,  # (T, N, H)
    kv_pages,  # (2, K, A, G, H)
    page_indices,  # (S, P)
    meta,  # (5, W) from prefill.build_work_list with block_q = ROWS
    count,  # (1,)
    *,
    sm_scale: float,
    num_programs: int = 132,
    interpret: bool = False,
):
    """(T, N, H): attention rows of every work entry; rows no entry covers are left undefined.

    num_programs: the persistent grid (one CTA per SM: a CTA's shared memory fills one).
    """
    T, N, H = q.shape
    _, K, _, G, _ = kv_pages.shape
    # JAXMM_MGPU_PROFILE=<dir>: Mosaic GPU's on-device profiler records the named scopes
    # (per warpgroup) into a trace there (`benchmarks/prefill_profile.py` reads it)
    profile_dir = os.environ.get("JAXMM_MGPU_PROFILE", "")
    profile = (
        dict(
            profile_space=int(os.environ.get("JAXMM_MGPU_PROFILE_SPACE", "640")),
            profile_dir=profile_dir,
        )
        if profile_dir and not interpret
        else {}
    )
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    tiled = (tiling, swizzle)

    def entry(meta_ref, count_ref, pt_ref, q_ref, kv_ref, out_ref):
        pl.run_scoped(
            lambda *scoped: _kernel(
                meta_ref,
                count_ref,
                pt_ref,
                q_ref,
                kv_ref,
                out_ref,
                scoped,
                sm_scale=sm_scale,
                group=N // K,
                interpret=interpret,
            ),
            (
                plgpu.SMEM((COMPUTE_WGS, BQ, H), q.dtype, transforms=tiled),
                plgpu.SMEM((COMPUTE_WGS, BQ, H), q.dtype),
                plgpu.SMEM((STEPS_IN_FLIGHT, BLOCK_K, H), q.dtype, transforms=tiled),
                plgpu.SMEM((STEPS_IN_FLIGHT, BLOCK_K, H), q.dtype, transforms=tiled),
            ),
            (
                plgpu.Barrier(num_arrivals=BLOCK_K // G, num_barriers=STEPS_IN_FLIGHT),
                plgpu.Barrier(num_arrivals=BLOCK_K // G, num_barriers=STEPS_IN_FLIGHT),
                plgpu.Barrier(num_barriers=COMPUTE_WGS),
            ),
            (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=STEPS_IN_FLIGHT),) * 2,
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((T, N, H), q.dtype),
        grid=(num_programs,),
        grid_names=("prog",),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, **profile),
        interpret=interpret_params() if interpret else None,
    )(meta, count, page_indices, q, kv_pages)
