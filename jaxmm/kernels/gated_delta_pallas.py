"""The gated delta rule on Pallas kernels that work on the state pool in place.

Why kernels: decode is bound by the recurrent state's bytes (Qwen3.5-9B: 32 x 128 x 128 f32 =
2 MiB per sequence and linear layer, about 40 times its q/k/v). The XLA path
(`gated_delta.ragged_gated_delta`) gathers every row's slot out of the pool, updates it in a
few fusions and scatters it back: several passes over those bytes. The decode kernel reads
each row's state from its slot once and writes it back to the same place once (the pool is
an aliased input/output), decaying it, applying the delta rule and reading the output between
the load and the store. In prefill the XLA path launches a few matmuls per 64-token chunk
in a loop; the chunk kernel walks a row's chunks with the state held on chip.

1. `decode_reference`: the decode contract in pure JAX (the oracle), on `gated_delta_step`.
2. `gated_delta_decode_gpu`: Pallas GPU, Triton lowering. Program (s, n, j) takes row s,
   value head n and a `block_v`-column slice of its state (Hk, block_v): the columns of the
   state are independent in the delta rule, so slices need no communication. Hk and the
   slice width must be powers of two (Triton's tile rule); other sizes take the reference.
3. `gated_delta_decode`: the platform's kernel (the TPU variant is `gated_delta_tpu.py`;
   off its device a kernel runs in interpret mode, as the CPU tests do).
4. `chunks_reference` / `gated_delta_chunks_gpu`: the sequential part of the chunkwise WY
   form (`gated_delta._chunk_prep` makes each chunk's u, w, scores and decayed q/k in XLA,
   batched over all chunks); program (row, n, j) carries its state slice from chunk to
   chunk, from the slot and back to it (the TPU variant: `gated_delta_tpu.py`).
5. `ragged_gated_delta_pallas`: `gated_delta.ragged_gated_delta` on these: single-token rows
   on the decode kernel, longer rows' chunks on the chunk kernel, neither copying the rows'
   states out of the pool and back (a step of decodes touches no other state byte).

Contract of the decode functions: q, k (S, N, Hk), v (S, N, Hv), g, beta (S, N); states
(slots + 1, N, Hk, Hv) float32; slots (S,) int32 each row's slot, negative to skip the row;
has_state (S,) whether the row continues its slot's state (else it starts from zeros,
whatever the slot held, NaN included). Returns out (S, N, Hv) float32 (zeros for skipped
rows) and the pool with each live row's new state. Two live rows must not share a slot
unless it is the scratch slot, whose content is then undefined.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxmm.kernels.gated_delta import _chunk_apply, _chunk_prep, gated_delta_step

f32 = jnp.float32


# -- 1. the reference ---------------------------------------------------------------------------
def decode_reference(q, k, v, g, beta, states, slots, has_state):
    """The decode contract (module docstring) in pure JAX."""
    spare = states.shape[0]
    slots, has_state = jnp.asarray(slots), jnp.asarray(has_state)
    live = slots >= 0
    src = jnp.where(live, slots, 0)
    keep = (live & has_state.astype(bool))[:, None, None, None]
    init = jnp.where(keep, states[src], 0.0)  # where, not a product: a stale slot may be NaN
    out, final = gated_delta_step(q, k, v, g, beta, init)
    out = jnp.where(live[:, None, None], out, 0.0)
    return out, states.at[jnp.where(live, slots, spare)].set(final, mode="drop")


# -- 2. the GPU kernel (Triton lowering) ----------------------------------------------------------
def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def gpu_supported(Hk: int, Hv: int) -> bool:
    """Head sizes the Triton tiles take (powers of two); others go to the reference."""
    return _pow2(Hk) and _pow2(Hv)


def _decode_kernel(
    slots_ref,  # (S,) int32
    keep_ref,  # (S,) int32
    q_ref,  # (S, N, Hk)
    k_ref,  # (S, N, Hk)
    v_ref,  # (S, N, Hv)
    g_ref,  # (S, N)
    beta_ref,  # (S, N)
    states_in,  # (slots + 1, N, Hk, Hv), aliased with states_ref
    out_ref,  # (S, N, Hv) f32
    states_ref,
    *,
    block_v: int,
):
    s, n, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    slot = slots_ref[s]
    cols = pl.ds(j * block_v, block_v)

    @pl.when(slot >= 0)
    def _update():
        st = states_in[slot, n, :, cols].astype(f32)  # (Hk, BV): read once
        st = jnp.where(keep_ref[s] != 0, st, 0.0)
        q = q_ref[s, n, :].astype(f32)
        k = k_ref[s, n, :].astype(f32)
        v = v_ref[s, n, cols].astype(f32)
        st = st * jnp.exp(g_ref[s, n].astype(f32))
        kv_mem = jnp.sum(st * k[:, None], axis=0)  # (BV,) what the state recalls for k
        delta = (v - kv_mem) * beta_ref[s, n].astype(f32)
        st = st + k[:, None] * delta[None, :]
        out_ref[s, n, cols] = jnp.sum(st * q[:, None], axis=0)
        states_ref[slot, n, :, cols] = st  # written once, in place

    @pl.when(slot < 0)
    def _skip():
        out_ref[s, n, cols] = jnp.zeros((block_v,), f32)


@functools.partial(jax.jit, static_argnames=("block_v", "num_warps", "interpret"))
def gated_delta_decode_gpu(
    q,
    k,
    v,
    g,
    beta,
    states,
    slots,
    has_state,
    *,
    block_v: int = 32,
    num_warps: int = 4,
    interpret: bool = False,
):
    """The decode contract on a Pallas GPU kernel (Triton lowering), the pool in place.

    `block_v`: state columns per program (a power of two, at most Hv; 32 keeps a 128-row
    slice in registers at 4 warps). Head sizes `gpu_supported` refuses take the reference.
    """
    S, N, Hk = q.shape
    Hv = v.shape[-1]
    if not gpu_supported(Hk, Hv):
        return decode_reference(q, k, v, g, beta, states, slots, has_state)
    bv = min(block_v, Hv)
    if not _pow2(bv):
        raise ValueError(f"block_v {block_v} must be a power of two")
    return pl.pallas_call(
        functools.partial(_decode_kernel, block_v=bv),
        grid=(S, N, Hv // bv),
        out_shape=[
            jax.ShapeDtypeStruct((S, N, Hv), f32),
            jax.ShapeDtypeStruct(states.shape, states.dtype),
        ],
        input_output_aliases={7: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="jaxmm_gated_delta_decode",
    )(
        slots.astype(jnp.int32),
        has_state.astype(jnp.int32),
        q,
        k,
        v,
        g,
        beta,
        states,
    )


# -- 3. the platform's kernel ---------------------------------------------------------------------
def gated_delta_decode(q, k, v, g, beta, states, slots, has_state, *, platform: str | None = None):
    """The decode contract on this platform's Pallas kernel: "gpu" (Triton), "tpu" (Mosaic),
    anything else the GPU kernel in interpret mode (CPU tests). `platform` defaults to JAX's."""
    platform = platform or jax.default_backend()
    args = (q, k, v, g, beta, states, slots, has_state)
    if platform == "tpu":
        from jaxmm.kernels.gated_delta_tpu import gated_delta_decode_tpu

        return gated_delta_decode_tpu(*args, interpret=jax.default_backend() != "tpu")
    return gated_delta_decode_gpu(*args, interpret=jax.default_backend() != "gpu")


# -- 4. the prefill chunks: the sequential state hand-off ----------------------------------------
def chunks_reference(u, w, attn, qd, kd, decay, states, slots, has_state, first):
    """The chunk contract in pure JAX: one loop over the step's real chunks.

    u (NC, N, C, Hv), w, qd, kd (NC, N, C, Hk), attn (NC, N, C, C), decay (NC, N): the
    step's chunks in row order, from `gated_delta._chunk_prep`; row r owns chunks
    [first[r], first[r + 1]) (first (S+1,)). A row with chunks starts from its slot (or zeros
    without has_state) and leaves its final state there. Returns out (NC, N, C, Hv), chunks
    past first[S] undefined, and the pool.
    """
    slots, has_state, first = (jnp.asarray(a) for a in (slots, has_state, first))
    NC = u.shape[0]
    S = slots.shape[0]
    total = first[-1]
    c = jnp.arange(NC)
    crow = jnp.minimum(jnp.searchsorted(first[1:], c, side="right"), S - 1)
    starts_row = c == first[crow]
    keep = has_state.astype(bool)

    def body(i, carry):
        st, states, outc = carry
        r = crow[i]
        own = lax.dynamic_index_in_dim(states, slots[r], 0, keepdims=False)
        st = jnp.where(starts_row[i], jnp.where(keep[r], own, 0.0), st)  # where: NaN-safe
        o, st = _chunk_apply(st, u[i], w[i], attn[i], qd[i], kd[i], decay[i])
        outc = lax.dynamic_update_index_in_dim(outc, o, i, 0)
        # every chunk writes its row's slot: the pool rides the loop in place, and a row's
        # last chunk leaves its final state
        states = lax.dynamic_update_index_in_dim(states, st.astype(states.dtype), slots[r], 0)
        return st, states, outc

    st0 = jnp.zeros(states.shape[1:], f32)
    _, states, outc = lax.fori_loop(0, total, body, (st0, states, jnp.zeros_like(u)))
    return outc, states


def chunks_gpu_supported(C: int, Hk: int, Hv: int) -> bool:
    """Sizes the Triton chunk tiles take: powers of two of at least 16 (tensor-core dots)."""
    return all(_pow2(x) and x >= 16 for x in (C, Hk, Hv))


def _chunks_kernel(
    first_ref,  # (S+1,) int32
    slots_ref,  # (S,) int32
    keep_ref,  # (S,) int32
    u_ref,  # (NC, N, C, Hv)
    w_ref,  # (NC, N, C, Hk)
    attn_ref,  # (NC, N, C, C)
    qd_ref,  # (NC, N, C, Hk)
    kdt_ref,  # (NC, N, Hk, C) keys decayed to the chunk end, transposed by XLA
    decay_ref,  # (NC, N)
    states_in,  # (slots + 1, N, Hk, Hv), aliased with states_ref
    out_ref,  # (NC, N, C, Hv)
    states_ref,
    *,
    block_v: int,
    precision,
):
    r, n, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    c0, c1 = first_ref[r], first_ref[r + 1]
    cols = pl.ds(j * block_v, block_v)

    def dot(a, b):
        return jnp.dot(a, b, precision=precision, preferred_element_type=f32)

    @pl.when(c1 > c0)
    def _row():
        slot = slots_ref[r]
        st = jnp.where(keep_ref[r] != 0, states_in[slot, n, :, cols].astype(f32), 0.0)

        def chunk(c, st):  # the state (Hk, BV) stays on chip from chunk to chunk
            v_new = u_ref[c, n, :, cols] - dot(w_ref[c, n], st)  # (C, BV)
            out_ref[c, n, :, cols] = dot(qd_ref[c, n], st) + dot(attn_ref[c, n], v_new)
            return st * decay_ref[c, n] + dot(kdt_ref[c, n], v_new)

        st = lax.fori_loop(c0, c1, chunk, st)
        states_ref[slot, n, :, cols] = st.astype(states_ref.dtype)  # written once


@functools.partial(jax.jit, static_argnames=("block_v", "num_warps", "interpret"))
def gated_delta_chunks_gpu(
    u,
    w,
    attn,
    qd,
    kd,
    decay,
    states,
    slots,
    has_state,
    first,
    *,
    block_v: int = 32,
    num_warps: int = 4,
    interpret: bool = False,
):
    """The chunk contract (`chunks_reference`) on a Pallas GPU kernel (Triton lowering).

    Program (row r, head n, column block j) walks row r's chunks in order with its slice of
    the state in registers: read from the slot once, written back once. Rows without chunks
    exit at once. Sizes `chunks_gpu_supported` refuses take the reference.
    """
    NC, N, C, Hv = u.shape
    Hk = w.shape[-1]
    S = slots.shape[0]
    bv = min(block_v, Hv)
    if not chunks_gpu_supported(C, Hk, bv):
        return chunks_reference(u, w, attn, qd, kd, decay, states, slots, has_state, first)
    return pl.pallas_call(
        functools.partial(_chunks_kernel, block_v=bv, precision=lax.Precision.HIGHEST),
        grid=(S, N, Hv // bv),
        out_shape=[
            jax.ShapeDtypeStruct(u.shape, f32),
            jax.ShapeDtypeStruct(states.shape, states.dtype),
        ],
        input_output_aliases={9: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="jaxmm_gated_delta_chunks",
    )(
        first.astype(jnp.int32),
        slots.astype(jnp.int32),
        has_state.astype(jnp.int32),
        u,
        w,
        attn,
        qd,
        jnp.swapaxes(kd, -1, -2),
        decay,
        states,
    )


def gated_delta_chunks(*args, platform: str | None = None):
    """The chunk contract on this platform's kernel, as `gated_delta_decode` picks it."""
    platform = platform or jax.default_backend()
    if platform == "tpu":
        from jaxmm.kernels.gated_delta_tpu import gated_delta_chunks_tpu

        return gated_delta_chunks_tpu(*args, interpret=jax.default_backend() != "tpu")
    return gated_delta_chunks_gpu(*args, interpret=jax.default_backend() != "gpu")


# -- 5. the engine's ragged entry point -----------------------------------------------------------
def ragged_gated_delta_pallas(
    q, k, v, g, beta, states, slots, cu_q_lens, has_state, chunk: int = 64, *, platform=None
):
    """`gated_delta.ragged_gated_delta` (same arguments and results) on the kernels.

    Single-token rows go through the decode kernel in place; it skips every other row (slot
    -1). Rows of more than one token are cut into chunks aligned to their start and go
    through the chunk kernel, which starts each row from its slot (or zeros) and leaves the
    final state there. The prefill part sits under a `cond`, skipped by a step of decodes.
    `platform` ("gpu", "tpu", other: interpret) defaults to JAX's default backend.
    """
    T, N, Hv = v.shape
    S = slots.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    single = q_lens == 1
    multi = q_lens > 1
    t0 = jnp.minimum(cu_q_lens[:-1], T - 1)
    dec_slots = jnp.where(single, slots, -1)
    rows = [a[t0] for a in (q, k, v, g, beta)]
    out_rows, states = gated_delta_decode(*rows, states, dec_slots, has_state, platform=platform)
    chunks = functools.partial(gated_delta_chunks, platform=platform)
    out = jnp.zeros((T, N, Hv), f32).at[jnp.where(single, t0, T)].set(out_rows, mode="drop")

    # chunks aligned to each multi-token row's start: at most T // chunk + (rows of >= 2);
    # at least one so a one-token step still traces the (untaken) prefill branch
    NC = max(1, T // chunk + min(S, T // 2))

    def prefill(args):
        out, states = args
        n_chunks = jnp.where(multi, -(-q_lens // chunk), 0)
        first = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(n_chunks)])  # (S+1,)
        total = first[-1]
        c = jnp.arange(NC)
        crow = jnp.minimum(jnp.searchsorted(first[1:], c, side="right"), S - 1)
        cstart = cu_q_lens[crow] + chunk * (c - first[crow])
        clen = jnp.where(c < total, jnp.minimum(chunk, cu_q_lens[crow + 1] - cstart), 0)
        pos = jnp.arange(chunk)
        tok = jnp.clip(cstart[:, None] + pos[None, :], 0, T - 1)  # (NC, C)
        valid = pos[None, :] < clen[:, None]

        def gather(a):
            m = valid.reshape(valid.shape + (1,) * (a.ndim - 1))
            return jnp.where(m, a[tok].astype(f32), 0.0)

        prep = _chunk_prep(*(gather(a) for a in (q, k, v, g, beta)))
        outc, states = chunks(*prep, states, slots, has_state, first)
        flat = jnp.swapaxes(outc, 1, 2).reshape(NC * chunk, N, Hv)
        out = out.at[jnp.where(valid, tok, T).reshape(-1)].set(flat, mode="drop")
        return out, states

    # the pool passes through the cond untouched on a decode step (aliased, not copied)
    return lax.cond(jnp.any(multi), prefill, lambda a: a, (out, states))
