"""The gated delta rule's decode update as a Pallas TPU (Mosaic) kernel, the state pool in place.

The contract is `gated_delta_pallas.decode_reference`'s. Grid (row s, head block b), a block
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
