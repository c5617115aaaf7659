"""The Mosaic GPU (Hopper) decode kernel (split_mode="mosaic") vs the pure-JAX reference.

On CPU it runs under Pallas' Mosaic GPU interpreter (the merge kernel in Triton interpret
mode); on an H100, `JAXMM_NATIVE_KERNELS=1` compiles both. Batches as in
test_ragged_paged_attention: slots nothing has written are NaN, page-table entries past a
sequence's pages are garbage.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmm.kernels.gpu import decode, decode_mgpu
from jaxmm.kernels.gpu.decode import DecodeOptions
from tests.kernels.gpu.test_ragged_paged_attention import check, make_batch

MOSAIC = DecodeOptions(split_mode="mosaic", block_k=64, num_stages=3, min_blocks_per_split=1)


def test_supported():
    assert decode_mgpu.supported(128, 16, 4, 64, jnp.bfloat16, None, None)
    assert decode_mgpu.supported(64, 8, 8, 128, jnp.float16, None, None)
    assert not decode_mgpu.supported(128, 16, 4, 64, jnp.float32, None, None)
    assert not decode_mgpu.supported(128, 16, 4, 32, jnp.bfloat16, None, None)
    assert not decode_mgpu.supported(128, 16, 4, 64, jnp.bfloat16, 64, None)
    assert not decode_mgpu.supported(128, 16, 4, 64, jnp.bfloat16, None, 30.0)


@pytest.mark.parametrize("group,head_dim", [(4, 128), (1, 64)])
def test_mixed_batch(group, head_dim):
    """Decodes of 1 to 5 KV blocks (several items each), a prefill chunk, padding rows."""
    args = make_batch(
        [1, 1, 1, 1, 6],
        [300, 65, 1, 140, 20],
        num_heads=2 * group,
        num_kv_heads=2,
        head_dim=head_dim,
        page_size=16,
        pages_per_seq=20,
        num_tokens=16,
        max_seqs=6,
        dtype=jnp.bfloat16,
    )
    check(args, jnp.bfloat16, decode_options=MOSAIC)


@pytest.mark.parametrize("programs_per_core", [1, 4])
def test_random_lengths(programs_per_core):
    """One item per sequence or several; 4 interpreted CTAs run many items each (the ring
    running on from one item to the next)."""
    rng = np.random.default_rng(programs_per_core)
    kv_lens = [int(x) for x in rng.integers(1, 400, 7)]
    args = make_batch(
        [1] * 7,
        kv_lens,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        page_size=16,
        pages_per_seq=25,
        max_seqs=8,
        num_tokens=8,
        dtype=jnp.float16,
        seed=programs_per_core,
    )
    opts = dataclasses.replace(MOSAIC, programs_per_core=programs_per_core)
    check(args, jnp.float16, plan={}, decode_options=opts)


def test_item_table():
    """Items cover each decode's blocks exactly once, in balance_work's order."""
    rng = np.random.default_rng(3)
    S, BK, target = 12, 64, 5
    kv = rng.integers(1, 1000, S)
    num_dec = 9
    meta = decode.balance_work(
        jnp.asarray(kv, jnp.int32),
        jnp.asarray([num_dec], jnp.int32),
        num_seqs=S,
        block_k=BK,
        sliding_window=None,
        target_items=target,
        min_blocks=1,
        longest_first=True,
    )
    W = decode.num_work_items(S, -(-1000 // BK), target, 1)
    seq, b0, b1, kvs = np.asarray(decode_mgpu.item_table(meta, W, block_k=BK))
    covered = {s: [] for s in range(S)}
    for w in range(W):
        if b1[w] > b0[w]:
            covered[seq[w]] += list(range(b0[w], b1[w]))
            assert kvs[w] == kv[seq[w]]
    for s in range(S):
        want = list(range(-(-kv[s] // BK))) if s < num_dec else []
        assert sorted(covered[s]) == want
