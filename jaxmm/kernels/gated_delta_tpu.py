"""The gated delta rule on Pallas TPU (Mosaic) kernels, the state pool in place: the decode
update (`gated_delta_decode_tpu`) and the prefill chunks' state hand-off
(`gated_delta_chunks_tpu`, at the end of the file).

The decode contract is `gated_delta_pallas.decode_reference`'s. Grid (row s, head block b), a block
being `heads` consecutive value heads. The pool is an aliased input/output whose BlockSpec
picks row s's slot through the scalar-prefetched slot table, so Pallas' pipeline brings
the (heads, Hk, Hv) states into VMEM once and writes them back once.

No `ref.reshape` / `ref.bitcast` (they break TPU interpret mode, docs/tpu.md): every layout
change happens in XLA before the call. q and k arrive as columns (S, N, Hk, 1) and v as
rows (S, N, 1, Hv), so inside the kernel `k * state` broadcasts k along the lanes and the
recall `sum over Hk` is a sublane reduction, with no in-kernel transpose. Per-row scalars
(slot, live, continue) and per-head scalars (decay exp(g), beta) sit in SMEM.

A skipped row (slot < 0) maps to the scratch slot and copies it through, because an output
block is always written back. Speed unmeasured (no TPU was available); tested in TPU
interpret mode on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

f32 = jnp.float32
BLOCK_BYTES = 512 * 1024  # state bytes per grid step: 4 buffers (in/out, double) in VMEM


def _heads_per_step(N: int, Hk: int, Hv: int) -> int:
    """The largest divisor of N whose states fit BLOCK_BYTES (at most 8: q/k columns pad
    their lane dimension to 128)."""
    per_head = Hk * Hv * 4
    return max(d for d in range(1, min(N, 8) + 1) if N % d == 0 and d * per_head <= BLOCK_BYTES)


def _kernel(
    # scalar prefetch (SMEM)
    slots_ref,  # (S,) int32, skipped rows on the scratch slot
    live_ref,  # (S,) int32
    keep_ref,  # (S,) int32
    # inputs
    decay_ref,  # (S * N,) f32 exp(g), SMEM
    beta_ref,  # (S * N,) f32, SMEM
    q_ref,  # (heads, Hk, 1)
    k_ref,  # (heads, Hk, 1)
    v_ref,  # (heads, 1, Hv)
    states_in,  # (heads, Hk, Hv)
    # outputs
    out_ref,  # (heads, 1, Hv)
    states_out,  # (heads, Hk, Hv), aliased with the pool
    *,
    heads: int,
    num_heads: int,
):
    s, b = pl.program_id(0), pl.program_id(1)
    live = live_ref[s] != 0
    keep = keep_ref[s] != 0

    def head(i, carry):
        idx = s * num_heads + b * heads + i
        st = states_in[i].astype(f32)  # (Hk, Hv)

        @pl.when(live)
        def _update():
            cur = jnp.where(keep, st, 0.0) * decay_ref[idx]
            k = k_ref[i].astype(f32)  # (Hk, 1)
            kv_mem = jnp.sum(cur * k, axis=0, keepdims=True)  # (1, Hv)
            delta = (v_ref[i].astype(f32) - kv_mem) * beta_ref[idx]
            new = cur + k * delta
            out_ref[i] = jnp.sum(new * q_ref[i].astype(f32), axis=0, keepdims=True)
            states_out[i] = new.astype(states_out.dtype)

        @pl.when(jnp.logical_not(live))
        def _copy():
            out_ref[i] = jnp.zeros(out_ref.shape[1:], f32)
            states_out[i] = states_in[i]

        return carry

    lax.fori_loop(0, heads, head, 0)


@functools.partial(jax.jit, static_argnames=("interpret", "heads"))
def gated_delta_decode_tpu(
    q,
    k,
    v,
    g,
    beta,
    states,
    slots,
    has_state,
    *,
    interpret: bool | pltpu.InterpretParams = False,
    heads: int | None = None,
):
    """The decode contract on a Pallas TPU kernel, the pool in place.

    `interpret`: True or a `pltpu.InterpretParams` runs TPU interpret mode (any backend).
    `heads`: value heads per grid step (a divisor of N; default from `_heads_per_step`).
    """
    S, N, Hk = q.shape
    Hv = v.shape[-1]
    hb = heads or _heads_per_step(N, Hk, Hv)
    if N % hb:
        raise ValueError(f"heads {hb} must divide the value heads {N}")
    spare = states.shape[0] - 1
    live = slots >= 0
    slot_map = jnp.where(live, slots, spare).astype(jnp.int32)
    # layouts for the kernel, made here: no reshape inside it
    qc, kc = q[..., None], k[..., None]  # (S, N, Hk, 1)
    vr = v[:, :, None, :]  # (S, N, 1, Hv)
    decay = jnp.exp(g.astype(f32)).reshape(-1)
    beta = beta.astype(f32).reshape(-1)

    col = pl.BlockSpec((None, hb, Hk, 1), lambda s, b, *_: (s, b, 0, 0))
    row = pl.BlockSpec((None, hb, 1, Hv), lambda s, b, *_: (s, b, 0, 0))
    pool = pl.BlockSpec((None, hb, Hk, Hv), lambda s, b, slot, *_: (slot[s], b, 0, 0))
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    if interpret is True:
        interpret = pltpu.InterpretParams()
    out, states = pl.pallas_call(
        functools.partial(_kernel, heads=hb, num_heads=N),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(S, N // hb),
            in_specs=[smem, smem, col, col, row, pool],
            out_specs=[row, pool],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((S, N, 1, Hv), f32),
            jax.ShapeDtypeStruct(states.shape, states.dtype),
        ],
        # operand 8 (after the 3 prefetched scalars) is the pool
        input_output_aliases={8: 1},
        # rows may share the scratch slot: keep the grid sequential
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        interpret=interpret or False,
        name="jaxmm_tpu_gated_delta_decode",
    )(
        slot_map,
        live.astype(jnp.int32),
        has_state.astype(jnp.int32),
        decay,
        beta,
        qc,
        kc,
        vr,
        states,
    )
    return out[:, :, 0, :], states


# -- the prefill chunks ----------------------------------------------------------------------------
def _chunks_kernel(
    # scalar prefetch (SMEM)
    slot_ref,  # (NC,) int32 the pool slot of each chunk's row (the scratch slot past the last)
    first_ref,  # (NC,) int32 whether the chunk is its row's first
    keep_ref,  # (NC,) int32 whether that row continues its slot's state
    real_ref,  # (NC,) int32 whether the chunk is real
    # inputs
    decay_ref,  # (NC * N,) f32, SMEM
    u_ref,  # (C, Hv)
    w_ref,  # (C, Hk)
    attn_ref,  # (C, C)
    qd_ref,  # (C, Hk)
    kdt_ref,  # (Hk, C)
    states_in,  # (Hk, Hv) block of the chunk's slot
    # outputs
    out_ref,  # (C, Hv)
    states_out,  # (Hk, Hv), aliased with the pool
    *,
    num_heads: int,
):
    n, c = pl.program_id(0), pl.program_id(1)

    def dot(a, b):
        return jnp.dot(a, b, precision=lax.Precision.HIGHEST, preferred_element_type=f32)

    # chunks of one row are consecutive grid steps on the same pool block, which Pallas keeps
    # in VMEM (written back when the block changes): the previous chunk's state is in
    # states_out; a row's first chunk reads the slot (or starts from zeros)
    @pl.when(first_ref[c] != 0)
    def _start():
        st = states_in[...].astype(f32)
        states_out[...] = jnp.where(keep_ref[c] != 0, st, 0.0).astype(states_out.dtype)

    @pl.when(real_ref[c] != 0)
    def _chunk():
        st = states_out[...].astype(f32)
        v_new = u_ref[...] - dot(w_ref[...], st)  # (C, Hv)
        out_ref[...] = dot(qd_ref[...], st) + dot(attn_ref[...], v_new)
        st = st * decay_ref[c * num_heads + n] + dot(kdt_ref[...], v_new)
        states_out[...] = st.astype(states_out.dtype)

    @pl.when(real_ref[c] == 0)
    def _pad():  # past the real chunks: the scratch slot passes through
        out_ref[...] = jnp.zeros(out_ref.shape, f32)
        states_out[...] = states_in[...]


@functools.partial(jax.jit, static_argnames=("interpret",))
def gated_delta_chunks_tpu(
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
    interpret: bool | pltpu.InterpretParams = False,
):
    """The chunk contract (`gated_delta_pallas.chunks_reference`) on a Pallas TPU kernel.

    Grid (head n, chunk c), chunks innermost and sequential: the pool's BlockSpec maps chunk
    c to its row's slot (scalar-prefetched), so a row's state stays in VMEM across its
    chunks and goes back to the slot once.
    """
    NC, N, C, Hv = u.shape
    Hk = w.shape[-1]
    S = slots.shape[0]
    spare = states.shape[0] - 1
    first = first.astype(jnp.int32)
    c = jnp.arange(NC)
    real = c < first[-1]
    crow = jnp.minimum(jnp.searchsorted(first[1:], c, side="right"), S - 1)
    slot_of = jnp.where(real, slots[crow], spare).astype(jnp.int32)
    starts = (real & (c == first[crow])) | ~real  # past the end: read the scratch slot
    keep = real & has_state.astype(bool)[crow]

    def block(*shape):
        return pl.BlockSpec((None, None, *shape), lambda n, c, *_: (c, n, 0, 0))

    pool = pl.BlockSpec((None, None, Hk, Hv), lambda n, c, slot, *_: (slot[c], n, 0, 0))
    if interpret is True:
        interpret = pltpu.InterpretParams()
    return pl.pallas_call(
        functools.partial(_chunks_kernel, num_heads=N),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(N, NC),
            in_specs=[
                pl.BlockSpec(memory_space=pltpu.SMEM),
                block(C, Hv),
                block(C, Hk),
                block(C, C),
                block(C, Hk),
                block(Hk, C),
                pool,
            ],
            out_specs=[block(C, Hv), pool],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(u.shape, f32),
            jax.ShapeDtypeStruct(states.shape, states.dtype),
        ],
        input_output_aliases={10: 1},  # after 4 prefetched scalars: decay, u, w, attn, qd, kdt
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret or False,
        name="jaxmm_tpu_gated_delta_chunks",
    )(
        slot_of,
        starts.astype(jnp.int32),
        keep.astype(jnp.int32),
        real.astype(jnp.int32),
        decay.astype(f32).reshape(-1),
        u,
        w,
        attn,
        qd,
        jnp.swapaxes(kd, -1, -2),
        states,
    )
