"""Grouped matmul (the MoE experts' GEMM) as a Pallas GPU kernel, with its pure-JAX reference.

Contract (as `jax.lax.ragged_dot` states it; the letters here are the matmul's own, M rows,
K contraction, N columns, E groups): lhs (M, K) with its rows sorted by group, rhs (E, K, N)
one matrix per group, group_sizes (E,) int32 rows per group. Row r of the result is
lhs[r] @ rhs[g] for the group g whose rows hold r; rows past sum(group_sizes) belong to no
group and come out zero (the MoE layer parks its padding tokens there). The result has lhs's
dtype; products accumulate in float32.

1. `grouped_matmul_reference`: the contract in pure JAX, one masked matmul per group (E times
   the work: the oracle, not a fast path).
2. `tile_metadata`: the static-shaped work list, computed in XLA before the kernel. The rows
   are cut into ceil(M / BM) tiles of BM rows; group g's rows [start_g, end_g) touch the
   tiles floor(start_g / BM) .. ceil(end_g / BM) - 1, and a tile that straddles a group
   boundary is visited once per group it holds, each visit writing only its group's rows
   (the megablocks/megablox scheme). The rows past the last group form one more group, the
   tail, whose visits write zeros. Groups and tail cover the M rows exactly, neighbours
   share at most one tile, so the visits number at most ceil(M / BM) + E: that is the
   work list's static length W, and visits past the real ones are marked idle. Empty groups
   get no visit, so a decode step reads only the experts its tokens chose.
3. `grouped_matmul_gpu`: Pallas, Triton lowering. Program (j, w) takes visit w of the work
   list and the j-th BN-column slice: it loops over K in BK slices, loading its BM rows of
   lhs (rows of other groups and past M masked to zero) and group g's (BK, BN) block of rhs,
   accumulates in float32 and stores only its group's rows. Any M, K, N and E; the block
   sizes are powers of two of at least 16 (Triton's dot tiles), clipped to the shape.
4. `grouped_matmul`: the platform's kernel: on a GPU this one compiled, on a TPU the Mosaic
   TPU variant (kernels/tpu/grouped_matmul.py, same work list; never run on a TPU yet),
   elsewhere the GPU kernel in interpret mode (CPU tests).

The pallas_call is not partitioned by GSPMD: with expert weights sharded over a mesh it has
to run under `jax.shard_map` (each device its own experts' groups), which is not wired yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

f32 = jnp.float32


def _common_dtype(lhs: jax.Array, rhs: jax.Array) -> jnp.dtype:
    return jnp.promote_types(lhs.dtype, rhs.dtype)


def _check(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"lhs (M, K) and rhs (E, K, N) expected; got {lhs.shape}, {rhs.shape}")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"group_sizes must be ({rhs.shape[0]},); got {group_sizes.shape}")


# -- 1. the reference ---------------------------------------------------------------------------
def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The contract (module docstring) in pure JAX: lhs (M, K), rhs (E, K, N) -> (M, N)."""
    _check(lhs, rhs, group_sizes)
    dtype = _common_dtype(lhs, rhs)
    M, E = lhs.shape[0], rhs.shape[0]
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    group = jnp.searchsorted(ends, jnp.arange(M), side="right")  # (M,): E past the last group
    prod = jnp.einsum(
        "MK,EKN->EMN",
        lhs.astype(dtype),
        rhs.astype(dtype),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=f32,
    )
    mine = group[None, :, None] == jnp.arange(E)[:, None, None]  # (E, M, 1)
    return jnp.sum(jnp.where(mine, prod, 0.0), axis=0).astype(dtype)


# -- 2. the work list -----------------------------------------------------------------------------
def num_visits(M: int, E: int, block_m: int) -> int:
    """W: the static bound on tile visits, ceil(M / BM) + E (module docstring, point 2)."""
    return pl.cdiv(M, block_m) + E


def tile_metadata(group_sizes: jax.Array, M: int, block_m: int) -> jax.Array:
    """The work list (4, W) int32: per visit its group (E for the tail, -1 idle), its row
    tile, and the first and one-past-last row it writes. Plain XLA, static shapes."""
    E = group_sizes.shape[0]
    W = num_visits(M, E, block_m)
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), M)  # sizes past M: clipped
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    # the tail [sum, M) is group E: its visits write the zero rows
    starts = jnp.concatenate([starts, ends[-1:]])
    ends = jnp.concatenate([ends, jnp.full((1,), M, jnp.int32)])
    first_tile = starts // block_m
    n_tiles = jnp.where(ends > starts, pl.cdiv(ends, block_m) - first_tile, 0)
    visit_end = jnp.cumsum(n_tiles)  # (E+1,) one past each group's last visit
    w = jnp.arange(W, dtype=jnp.int32)
    group = jnp.searchsorted(visit_end, w, side="right").astype(jnp.int32)
    live = group <= E  # visits past the real ones have no group
    g = jnp.minimum(group, E)
    tile = first_tile[g] + w - (visit_end[g] - n_tiles[g])
    return jnp.stack(
        [
            jnp.where(live, group, -1),
            jnp.where(live, tile, 0),
            jnp.where(live, starts[g], 0),
            jnp.where(live, ends[g], 0),
        ]
    ).astype(jnp.int32)


# -- 3. the GPU kernel (Triton lowering) ----------------------------------------------------------
def _pow2_block(want: int, dim: int) -> int:
    """A power-of-two block of at least 16, no larger than `want` or dim's next power of two."""
    if want < 16 or want & (want - 1):
        raise ValueError(f"block sizes must be powers of two >= 16; got {want}")
    return max(16, min(want, 1 << max(0, dim - 1).bit_length()))


def _gmm_kernel(
    meta_ref,  # (4, W) int32: group, row tile, first row, end row of each visit
    lhs_ref,  # (M, K)
    rhs_ref,  # (E, K, N)
    out_ref,  # (M, N)
    *,
    block_m: int,
    block_n: int,
    block_k: int,
    precision,
):
    M, K = lhs_ref.shape
    E, _, N = rhs_ref.shape
    j, w = pl.program_id(0), pl.program_id(1)
    g, tile, lo, hi = meta_ref[0, w], meta_ref[1, w], meta_ref[2, w], meta_ref[3, w]
    rows = pl.ds(tile * block_m, block_m)
    cols = pl.ds(j * block_n, block_n)
    r = tile * block_m + lax.broadcasted_iota(jnp.int32, (block_m, block_n), 0)
    c = j * block_n + lax.broadcasted_iota(jnp.int32, (block_m, block_n), 1)
    # only this group's rows: a straddled tile's other rows belong to another visit
    out_mask = (r >= lo) & (r < hi) & (c < N)

    @pl.when((g >= 0) & (g < E))
    def _group():
        row_ok = (lax.broadcasted_iota(jnp.int32, (block_m, block_k), 0) + tile * block_m) >= lo
        row_ok &= (lax.broadcasted_iota(jnp.int32, (block_m, block_k), 0) + tile * block_m) < hi
        kk_a = lax.broadcasted_iota(jnp.int32, (block_m, block_k), 1)
        kk_b = lax.broadcasted_iota(jnp.int32, (block_k, block_n), 0)
        col_ok = (j * block_n + lax.broadcasted_iota(jnp.int32, (block_k, block_n), 1)) < N

        def body(kb, acc):
            k0 = kb * block_k
            ks = pl.ds(k0, block_k)
            # only this group's rows are read; past K both sides load zeros (past the end
            # the memory may hold NaN, and 0 * NaN would reach the sums)
            a = plgpu.load(lhs_ref.at[rows, ks], mask=row_ok & (kk_a + k0 < K), other=0.0)
            b = plgpu.load(rhs_ref.at[g, ks, cols], mask=col_ok & (kk_b + k0 < K), other=0.0)
            return acc + jnp.dot(a, b, precision=precision, preferred_element_type=f32)

        acc = lax.fori_loop(0, pl.cdiv(K, block_k), body, jnp.zeros((block_m, block_n), f32))
        plgpu.store(out_ref.at[rows, cols], acc.astype(out_ref.dtype), mask=out_mask)

    @pl.when(g == E)
    def _tail():  # rows past the last group: zeros, whatever the input rows hold
        zeros = jnp.zeros((block_m, block_n), out_ref.dtype)
        plgpu.store(out_ref.at[rows, cols], zeros, mask=out_mask)


def default_blocks(M: int, E: int) -> tuple[int, int, int]:
    """(block_m, block_n, block_k) before clipping: BM the rows one group holds on average
    as a power of two, 16 to 128 (a tile mostly of one group, little masked work); with
    small tiles BN 64 instead of 128, so that a decode step's few visits still spread over
    the GPU's SMs. A first guess: benchmarks/moe_layer.py times variants on a GPU."""
    bm = min(128, max(16, 1 << (pl.cdiv(max(M, 1), E) - 1).bit_length()))
    return bm, 64 if bm <= 32 else 128, 64


def _blocks(M: int, K: int, N: int, E: int, block_m, block_n, block_k):
    dm, dn, dk = default_blocks(M, E)
    return (
        _pow2_block(block_m or dm, M),
        _pow2_block(block_n or dn, N),
        _pow2_block(block_k or dk, K),
    )


def run_work_list(
    meta: jax.Array,
    lhs: jax.Array,
    rhs: jax.Array,
    *,
    block_m: int,
    block_n: int,
    block_k: int,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:
    """The kernel on a given work list `meta` (4, W) from `tile_metadata` with this block_m;
    blocks already valid (see `grouped_matmul_gpu`). Visits may run in any order."""
    M, K = lhs.shape
    E, _, N = rhs.shape
    precision = lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
    kernel = functools.partial(
        _gmm_kernel, block_m=block_m, block_n=block_n, block_k=block_k, precision=precision
    )
    return pl.pallas_call(
        kernel,
        # Triton launches the first axis fastest: a visit's column slices run side by side,
        # sharing its lhs rows and its expert's rows of rhs in L2
        grid=(pl.cdiv(N, block_n), meta.shape[1]),
        out_shape=jax.ShapeDtypeStruct((M, N), lhs.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxmm_grouped_matmul",
    )(meta, lhs, rhs)


@functools.partial(
    jax.jit,
    static_argnames=("block_m", "block_n", "block_k", "num_warps", "num_stages", "interpret"),
)
def grouped_matmul_gpu(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:
    """The contract on a Pallas GPU kernel (Triton lowering): lhs (M, K), rhs (E, K, N).

    Blocks: powers of two >= 16 (None: `default_blocks`), each clipped to its dimension's
    next power of two (a decode step of 8 rows runs 16-row tiles). Float32 inputs multiply
    at full precision (no TF32), matching the reference."""
    _check(lhs, rhs, group_sizes)
    dtype = _common_dtype(lhs, rhs)
    lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
    M, K = lhs.shape
    E, _, N = rhs.shape
    bm, bn, bk = _blocks(M, K, N, E, block_m, block_n, block_k)
    if M == 0 or N == 0:
        return jnp.zeros((M, N), dtype)
    meta = tile_metadata(group_sizes, M, bm)
    return run_work_list(
        meta,
        lhs,
        rhs,
        block_m=bm,
        block_n=bn,
        block_k=bk,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
    )


# -- 4. the platform's kernel ---------------------------------------------------------------------
def grouped_matmul(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, platform: str | None = None, **blocks
) -> jax.Array:
    """The contract on this platform's kernel: "gpu" (Triton), "tpu" (Mosaic), anything else
    the GPU kernel in interpret mode (CPU tests). `platform` defaults to JAX's backend; a
    kernel off its own device runs interpreted. `blocks`: the kernel's block sizes."""
    platform = platform or jax.default_backend()
    native = jax.default_backend() == platform
    if platform == "tpu":
        from jaxmm.kernels.tpu.grouped_matmul import grouped_matmul_tpu

        return grouped_matmul_tpu(lhs, rhs, group_sizes, interpret=not native, **blocks)
    return grouped_matmul_gpu(
        lhs, rhs, group_sizes, interpret=platform != "gpu" or not native, **blocks
    )
