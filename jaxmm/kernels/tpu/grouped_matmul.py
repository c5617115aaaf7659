"""The grouped matmul (kernels/grouped_matmul.py's contract) as a Pallas TPU (Mosaic) kernel.

Status: correct in TPU interpret mode on CPU; never compiled by Mosaic nor timed (no TPU was
available). On a TPU, `jax.lax.ragged_dot` is the measured path; this is a candidate.

Same work list as the GPU kernel (`grouped_matmul.tile_metadata`: one visit per group a
BM-row tile holds, the tail past the groups as group E, idle visits last), scalar-prefetched
into SMEM. Grid (column block j, visit w, K block kk), kk innermost; BlockSpecs bring visit
w's (BM, BK) rows of lhs and its group's (BK, BN) block of rhs into VMEM and a float32
scratch accumulates over kk. Why it is correct without atomics: an output block stays in
VMEM while its block index stays the same and is written back when it changes. The visits
of one tile are consecutive in the work list, so each visit merges its group's rows into the
resident block (`where`) and the block leaves VMEM only once all of its rows are written.
Idle visits map to the last tile (the last real visit's) and change nothing.

DMA economy: visits that multiply nothing (the tail, idle) keep the block indices of the
last visit that did, so Pallas fetches nothing new for them: a decode step's padding
tokens cost no expert weight reads.

Blocks: BM a power of two >= 16 (bf16 packs 16 rows per vreg tile); BN and BK multiples of
128 or the whole dimension (Mosaic's lane rule). K past the last full block is masked to
zero on both sides. No `ref.reshape` / `ref.bitcast` (they break TPU interpret mode).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxmm.kernels.grouped_matmul import _check, _common_dtype, default_blocks, tile_metadata

f32 = jnp.float32


def _lane_block(want: int, dim: int, name: str) -> int:
    """The whole dimension when it fits `want`, else `want` (a multiple of 128)."""
    if dim <= want:
        return dim
    if want % 128:
        raise ValueError(f"{name} must be a multiple of 128; got {want}")
    return want


def _kernel(
    # scalar prefetch (SMEM), each (W,) int32
    group_ref,  # the visit's group: E the tail, -1 idle
    tile_ref,  # the row tile the visit writes (idle: the last tile)
    lo_ref,  # first row it writes
    hi_ref,  # one past the last row it writes
    src_ref,  # the group whose rhs blocks are mapped (the last multiplying visit's)
    # blocks
    lhs_ref,  # (BM, BK)
    rhs_ref,  # (BK, BN)
    out_ref,  # (BM, BN)
    acc_ref,  # (BM, BN) float32 scratch
    *,
    K: int,
    E: int,
    block_k: int,
    precision,
):
    del src_ref  # read by the index maps only
    w, kk = pl.program_id(1), pl.program_id(2)
    g = group_ref[w]
    bm, bn = acc_ref.shape

    @pl.when(kk == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((g >= 0) & (g < E))
    def _multiply():
        a, b = lhs_ref[...], rhs_ref[...]
        if K % block_k:  # the last K block reads past K: zeros on both sides (0 * NaN)
            k0 = kk * block_k
            a = jnp.where(lax.broadcasted_iota(jnp.int32, a.shape, 1) + k0 < K, a, 0)
            b = jnp.where(lax.broadcasted_iota(jnp.int32, b.shape, 0) + k0 < K, b, 0)
        acc_ref[...] += jnp.dot(a, b, precision=precision, preferred_element_type=f32)

    @pl.when(kk == pl.num_programs(2) - 1)
    def _merge():  # this visit's rows into the resident output block; the tail's are zeros
        r = tile_ref[w] * bm + lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
        mine = (r >= lo_ref[w]) & (r < hi_ref[w])
        out_ref[...] = jnp.where(mine, acc_ref[...].astype(out_ref.dtype), out_ref[...])


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "interpret"))
def grouped_matmul_tpu(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    block_m: int | None = None,
    block_n: int = 256,
    block_k: int = 512,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """The grouped-matmul contract on a Pallas TPU kernel: lhs (M, K), rhs (E, K, N).

    `interpret`: True or a `pltpu.InterpretParams` runs TPU interpret mode (any backend).
    block_m: a power of two >= 16 (default: `default_blocks`); block_n, block_k: multiples
    of 128, or larger than the dimension (then the whole of it)."""
    _check(lhs, rhs, group_sizes)
    dtype = _common_dtype(lhs, rhs)
    lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
    M, K = lhs.shape
    E, _, N = rhs.shape
    if M == 0 or N == 0:
        return jnp.zeros((M, N), dtype)
    bm = block_m or default_blocks(M, E)[0]
    if bm < 16 or bm & (bm - 1):
        raise ValueError(f"block_m must be a power of two >= 16; got {bm}")
    bn, bk = _lane_block(block_n, N, "block_n"), _lane_block(block_k, K, "block_k")
    nk = pl.cdiv(K, bk)

    group, tile, lo, hi = tile_metadata(group_sizes, M, bm)
    multiplies = (group >= 0) & (group < E)
    W = group.shape[0]
    # idle visits stay on the last tile (the last real visit's): its block is not rewritten
    tile = jnp.where(group < 0, pl.cdiv(M, bm) - 1, tile)
    # visits that multiply nothing keep the last multiplying visit's rhs block (no DMA)
    last = lax.cummax(jnp.where(multiplies, jnp.arange(W), -1))
    src = jnp.where(last >= 0, group[jnp.maximum(last, 0)], 0)
    prefetch = [a.astype(jnp.int32) for a in (group, tile, lo, hi, src)]

    def k_block(kk, g_ref, w):  # the K block a visit maps: the last one if it multiplies none
        g = g_ref[w]
        return jnp.where((g >= 0) & (g < E), kk, nk - 1)

    def lhs_map(j, w, kk, g_ref, t_ref, lo_ref, hi_ref, s_ref):
        return t_ref[w], k_block(kk, g_ref, w)

    def rhs_map(j, w, kk, g_ref, t_ref, lo_ref, hi_ref, s_ref):
        return s_ref[w], k_block(kk, g_ref, w), j

    def out_map(j, w, kk, g_ref, t_ref, lo_ref, hi_ref, s_ref):
        return t_ref[w], j

    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    if interpret is True:
        interpret = pltpu.InterpretParams()
    return pl.pallas_call(
        functools.partial(_kernel, K=K, E=E, block_k=bk, precision=precision),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(pl.cdiv(N, bn), W, nk),
            in_specs=[
                pl.BlockSpec((bm, bk), lhs_map),
                pl.BlockSpec((None, bk, bn), rhs_map),
            ],
            out_specs=pl.BlockSpec((bm, bn), out_map),
            scratch_shapes=[pltpu.VMEM((bm, bn), f32)],
        ),
        out_shape=jax.ShapeDtypeStruct((M, N), dtype),
        # column blocks are independent; a tile's visits must run in order (see the docstring)
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=interpret or False,
        name="jaxmm_tpu_grouped_matmul",
    )(*prefetch, lhs, rhs)
