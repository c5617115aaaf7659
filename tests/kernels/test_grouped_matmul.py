"""The Pallas grouped matmul (Triton lowering, and the Mosaic TPU variant; interpret mode on
CPU) against its pure-JAX reference, the reference against a per-row loop, the work list's
coverage, and the MoE block on the kernel against the dense oracle.

On a GPU, `JAXMM_NATIVE_KERNELS=1` runs the kernel compiled instead of interpreted. Rows past
the groups hold NaN in every case: the result must still be exactly zero there.
"""

from __future__ import annotations

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmm.kernels import grouped_matmul as gm
from jaxmm.kernels.tpu import grouped_matmul as gmt
from jaxmm.layers import moe

INTERPRET = os.environ.get("JAXMM_NATIVE_KERNELS") != "1"
TOL = {jnp.float32: dict(atol=1e-5, rtol=1e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _case(M, K, N, sizes, dtype=jnp.float32, seed=0):
    rs = np.random.RandomState(seed)
    lhs = rs.randn(M, K).astype(np.float32)
    lhs[min(sum(sizes), M) :] = np.nan  # rows of no group: must not reach the result
    rhs = rs.randn(len(sizes), K, N).astype(np.float32)
    return jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype), jnp.asarray(sizes, jnp.int32)


def _loop(lhs, rhs, sizes):
    """The contract by hand: row r times its group's matrix, in float64."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    r = 0
    for g, n in enumerate(np.asarray(sizes)):
        out[r : r + n] = lhs[r : r + n] @ rhs[g]
        r += n
    return out


# (M, K, N, group sizes, block_m): odd M, empty groups (first, middle, last), groups that
# straddle 16-row tiles, one group holding every row, E = 1, rows past the groups, K and N
# not multiples of the blocks, no rows in any group
CASES = [
    (37, 40, 24, [0, 10, 0, 20, 3, 0], 16),
    (50, 16, 16, [0, 0, 50, 0], 16),
    (19, 24, 40, [19], 16),
    (21, 33, 17, [4], 16),
    (70, 32, 48, [5, 17, 1, 1, 30, 9], 32),
    (9, 16, 16, [0, 0, 0], 16),
]


@pytest.mark.parametrize("M,K,N,sizes,bm", CASES)
def test_kernel_matches_reference_f32(M, K, N, sizes, bm):
    lhs, rhs, gs = _case(M, K, N, sizes, seed=M)
    ref = gm.grouped_matmul_reference(lhs, rhs, gs)
    np.testing.assert_allclose(np.asarray(ref), _loop(lhs, rhs, gs), atol=1e-4, rtol=1e-5)
    out = gm.grouped_matmul_gpu(
        lhs, rhs, gs, block_m=bm, block_n=16, block_k=16, interpret=INTERPRET
    )
    assert out.shape == (M, N) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL[jnp.float32])
    np.testing.assert_array_equal(np.asarray(out)[sum(sizes) :], 0.0)


def test_result_does_not_depend_on_visit_order():
    """GPU programs run in any order: each visit must write only its own group's rows, so
    the work list reversed (the tail first, every straddled tile's later group before its
    earlier one) gives the same result. Interpret mode runs visits in list order."""
    M, K, N, sizes = 37, 40, 24, [0, 10, 0, 20, 3, 0]
    lhs, rhs, gs = _case(M, K, N, sizes, seed=5)
    meta = gm.tile_metadata(gs, M, 16)
    run = functools.partial(
        gm.run_work_list, block_m=16, block_n=16, block_k=16, interpret=INTERPRET
    )
    ref = gm.grouped_matmul_reference(lhs, rhs, gs)
    for order in (meta, meta[:, ::-1]):
        out = np.asarray(run(order, lhs, rhs))
        np.testing.assert_allclose(out, np.asarray(ref), **TOL[jnp.float32])
        np.testing.assert_array_equal(out[sum(sizes) :], 0.0)


# TPU interpret mode is slower per grid step: a few cases, one with K and N past one block
TPU_CASES = [CASES[0], CASES[3], CASES[5], (40, 300, 260, [5, 0, 20, 7], 16)]


@pytest.mark.parametrize("M,K,N,sizes,bm", TPU_CASES)
def test_tpu_kernel_matches_reference(M, K, N, sizes, bm):
    """The Mosaic TPU variant in TPU interpret mode: blocks of 128 where K, N exceed them
    (masked K remainder, dropped N remainder), whole dimensions below."""
    lhs, rhs, gs = _case(M, K, N, sizes, seed=M + 1)
    ref = np.asarray(gm.grouped_matmul_reference(lhs, rhs, gs))
    out = np.asarray(
        gmt.grouped_matmul_tpu(lhs, rhs, gs, block_m=bm, block_n=128, block_k=128, interpret=True)
    )
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(out[sum(sizes) :], 0.0)


@pytest.mark.parametrize("platform", ["gpu", "tpu", "cpu"])
def test_platform_dispatch(platform):
    """`grouped_matmul` takes each platform's kernel (interpreted off its device) with its
    default blocks: all agree with the reference."""
    lhs, rhs, gs = _case(30, 24, 20, [3, 0, 11, 9], seed=7)
    out = gm.grouped_matmul(lhs, rhs, gs, platform=platform)
    ref = gm.grouped_matmul_reference(lhs, rhs, gs)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL[jnp.float32])


def test_kernel_bf16_default_blocks():
    """bf16 in and out, float32 accumulation, the default (clipped) blocks."""
    lhs, rhs, gs = _case(45, 64, 48, [7, 0, 30, 5], dtype=jnp.bfloat16, seed=1)
    out = gm.grouped_matmul_gpu(lhs, rhs, gs, interpret=INTERPRET)
    assert out.dtype == jnp.bfloat16
    ref = gm.grouped_matmul_reference(lhs, rhs, gs)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), **TOL[jnp.bfloat16]
    )
    np.testing.assert_allclose(
        np.asarray(out, np.float32), _loop(lhs, rhs, gs), atol=0.1, rtol=2e-2
    )
    np.testing.assert_array_equal(np.asarray(out, np.float32)[42:], 0.0)


def test_work_list_covers_every_row_once():
    """Every row of 0..M-1 is written by exactly one live visit, by its own group (the tail
    E past the groups), and the live visits fit the static bound for any routing."""
    rs = np.random.RandomState(0)
    metadata = jax.jit(gm.tile_metadata, static_argnums=(1, 2))
    shapes = [(M, E) for M in (1, 16, 37, 90) for E in (1, 5, 8)]
    for trial, (M, E) in enumerate(shapes * 3):
        bm = 16
        sizes = rs.multinomial(rs.randint(0, M + 1), rs.dirichlet(np.ones(E) * 0.3))
        meta = np.asarray(metadata(jnp.asarray(sizes, jnp.int32), M, bm))
        assert meta.shape == (4, gm.num_visits(M, E, bm))
        group_of_row = np.searchsorted(np.cumsum(sizes), np.arange(M), side="right")
        written = np.zeros(M, int)
        for g, tile, lo, hi in meta.T:
            if g < 0:
                continue
            rows = np.arange(tile * bm, tile * bm + bm)
            rows = rows[(rows >= lo) & (rows < hi)]
            assert len(rows) > 0, (trial, g, tile)  # no visit without work
            assert (group_of_row[rows] == g).all()
            written[rows] += 1
        np.testing.assert_array_equal(written, 1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_triton_lowering_takes_the_kernel(dtype):
    """The kernel lowers through Pallas' Triton lowering (no GPU needed to lower for CUDA):
    one Triton custom call whose grid is (column blocks, visit bound W). Decode-sized rows
    (8 rows of the Qwen3-30B-A3B gate projection: 16-row tiles, 64-column blocks)."""
    M, K, N, E = 8, 2048, 768, 128
    args = (
        jax.ShapeDtypeStruct((M, K), dtype),
        jax.ShapeDtypeStruct((E, K, N), dtype),
        jax.ShapeDtypeStruct((E,), jnp.int32),
    )
    run = jax.jit(functools.partial(gm.grouped_matmul_gpu, interpret=False))
    text = run.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(
        r"custom_call @__gpu\$xla\.gpu\.triton.*grid_x = (\d+).*grid_y = (\d+)", text
    )
    assert calls == [(str(N // 64), str(gm.num_visits(M, E, 16)))]


def test_bad_block_and_shapes_raise():
    lhs, rhs, gs = _case(8, 16, 16, [8])
    with pytest.raises(ValueError, match="powers of two"):
        gm.grouped_matmul_gpu(lhs, rhs, gs, block_m=24, interpret=True)
    with pytest.raises(ValueError, match="group_sizes"):
        gm.grouped_matmul_gpu(lhs, rhs, gs[:0], interpret=True)
    lhs, rhs, gs = _case(8, 16, 200, [8])
    with pytest.raises(ValueError, match="multiple of 128"):
        gmt.grouped_matmul_tpu(lhs, rhs, gs, block_n=96, interpret=True)


def test_moe_block_pallas_matches_dense():
    """The MoE block on the kernel (three grouped matmuls over the sorted rows) equals the
    dense oracle, with a bucket's padding tokens (NaN rows) routed nowhere."""
    T, D, F, E, k, n = 12, 16, 24, 8, 2, 9
    blocks = {}
    for impl in ("dense", "pallas"):
        blocks[impl] = moe.SparseMoeBlock(
            D, F, E, k, "silu", norm_topk_prob=True, impl=impl, rngs=nnx.Rngs(0)
        )
    ks = jax.random.split(jax.random.key(0), 5)
    weights = {
        "gate_proj": jax.random.normal(ks[0], (E, D, F)) * 0.3,
        "up_proj": jax.random.normal(ks[1], (E, D, F)) * 0.3,
        "down_proj": jax.random.normal(ks[2], (E, F, D)) * 0.3,
    }
    router = jax.random.normal(ks[3], (D, E))
    for b in blocks.values():
        for name, w in weights.items():
            getattr(b.experts, name)[...] = w
        b.gate.kernel[...] = router  # nnx.Linear: (D, E)
    valid = jnp.arange(T) < n
    x = jnp.where(valid[:, None], jax.random.normal(ks[4], (T, D)), jnp.nan)
    ref = blocks["dense"](x[:n])
    out = nnx.jit(lambda b, x, v: b(x, valid=v))(blocks["pallas"], x, valid)
    np.testing.assert_allclose(np.asarray(out[:n]), np.asarray(ref), rtol=1e-5, atol=1e-5)
