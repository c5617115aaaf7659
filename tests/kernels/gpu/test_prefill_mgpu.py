"""The Mosaic GPU (Hopper) prefill kernel vs the pure-JAX reference.

On CPU it runs under Pallas' Mosaic GPU interpreter (shared memory, TMA copies and barriers
simulated; uninitialised memory and reads past an array's end are NaN). On an H100,
`JAXMM_NATIVE_KERNELS=1` compiles it. Batches as in test_ragged_paged_attention: slots
nothing has written are NaN, page-table entries past a sequence's pages are garbage.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from jaxmm.kernels.gpu import prefill_mgpu
from tests.kernels.gpu.test_ragged_paged_attention import check, make_batch

MOSAIC = {"prefill_impl": "mosaic"}


def test_supported():
    assert prefill_mgpu.supported(128, 16, jnp.bfloat16, None, None)
    assert prefill_mgpu.supported(64, 8, jnp.float16, None, None)
    assert not prefill_mgpu.supported(128, 16, jnp.float32, None, None)
    assert not prefill_mgpu.supported(80, 16, jnp.bfloat16, None, None)
    assert not prefill_mgpu.supported(128, 4, jnp.bfloat16, None, None)
    assert not prefill_mgpu.supported(128, 16, jnp.bfloat16, 64, None)
    assert not prefill_mgpu.supported(128, 16, jnp.bfloat16, None, 30.0)


def test_mixed_batch_gqa4():
    """Decodes, a chunk with earlier context, a fresh prompt, padding; 4 query heads per KV."""
    args = make_batch(
        [1, 1, 7, 5, 9],
        [9, 30, 18, 5, 9],
        num_heads=4,
        num_kv_heads=1,
        head_dim=64,
        page_size=8,
        pages_per_seq=4,
        num_tokens=28,
        max_seqs=6,
        dtype=jnp.bfloat16,
    )
    check(args, jnp.bfloat16, plan=MOSAIC)


@pytest.mark.parametrize("dtype", [jnp.float16])
def test_long_chunk_several_blocks(dtype):
    """130 query rows (two work entries, the second with 2 rows) over 300 keys (3 KV blocks,
    the last one partial): unmasked blocks, the diagonal, the ring of slots, partial stores."""
    args = make_batch(
        [130, 3],
        [300, 3],
        num_heads=2,
        num_kv_heads=2,
        head_dim=128,
        page_size=16,
        pages_per_seq=20,
        num_tokens=140,
        max_seqs=3,
        dtype=dtype,
    )
    check(args, dtype, plan=MOSAIC)


def test_several_items_per_program():
    """Rows starting at 0, 13, 64, 128 (at and off multiples of 8), two query heads: each of
    the 4 interpreted programs runs two items back to back (the KV ring running on from one
    to the next, the query staging buffer reused after an output store)."""
    args = make_batch(
        [13, 51, 64, 40],
        [20, 51, 100, 40],
        num_heads=2,
        num_kv_heads=1,
        head_dim=64,
        page_size=8,
        pages_per_seq=16,
        num_tokens=176,
        max_seqs=5,
        dtype=jnp.bfloat16,
    )
    check(args, jnp.bfloat16, plan=MOSAIC)
