"""Pallas ragged paged attention vs the pure-JAX reference.

On CPU the kernels run in Pallas interpret mode. On a GPU, `JAXMM_NATIVE_KERNELS=1` runs the
same grid compiled (the device check in docs/performance.md).

Every batch: kv lengths that are not multiples of the page size, page-table entries past a
sequence's pages that are garbage, and every slot nothing has written filled with NaN, so a
stray read shows up as NaN in the output.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmm.kernels import kv_write, reference
from jaxmm.kernels.gpu import decode
from jaxmm.kernels.gpu import ragged_paged_attention as rpa
from jaxmm.kernels.gpu.decode import DecodeOptions

NATIVE = os.environ.get("JAXMM_NATIVE_KERNELS") == "1"
INTERPRET = not NATIVE

# (atol, rtol) against the f32 reference, by input dtype. bf16/fp16: probabilities are
# rounded to the input dtype before the P.V product, as in every flash kernel.
TOL = {
    jnp.float32: (2e-5, 2e-5),
    jnp.bfloat16: (2e-2, 2e-2),
    jnp.float16: (4e-3, 4e-3),
}


def make_batch(
    q_lens,
    kv_lens,
    *,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    page_size=4,
    pages_per_seq=8,
    num_tokens=None,
    max_seqs=None,
    num_pages=None,
    dtype=jnp.float32,
    seed=0,
):
    """A ragged batch; cache slots before this step hold data, all others NaN."""
    rng = np.random.default_rng(seed)
    n = len(q_lens)
    S = max_seqs or n
    T = num_tokens or sum(q_lens)
    G, P = page_size, pages_per_seq
    need = sum(-(-kl // G) for kl in kv_lens)
    A = num_pages or need + 3
    cu = np.zeros(S + 1, np.int32)
    cu[1 : n + 1] = np.cumsum(q_lens)
    cu[n + 1 :] = cu[n]
    kvl = np.zeros(S, np.int32)
    kvl[:n] = kv_lens
    perm = rng.permutation(A)
    pi = rng.integers(-5, A + 5, (S, P)).astype(np.int32)  # garbage, even out of range
    used = 0
    for s in range(n):
        npg = -(-kv_lens[s] // G)
        assert npg <= P and q_lens[s] <= kv_lens[s]
        pi[s, :npg] = perm[used : used + npg]
        used += npg
    kvp = np.full((2, num_kv_heads, A, G, head_dim), np.nan, np.float32)
    for s in range(n):
        for t in range(kv_lens[s] - q_lens[s]):
            kvp[:, :, pi[s, t // G], t % G] = rng.standard_normal((2, num_kv_heads, head_dim))
    q = rng.standard_normal((T, num_heads, head_dim))
    k = rng.standard_normal((T, num_kv_heads, head_dim))
    v = rng.standard_normal((T, num_kv_heads, head_dim))

    def c(x):
        return jnp.asarray(np.asarray(x, np.float32), dtype)

    return (
        c(q),
        c(k),
        c(v),
        c(kvp),
        jnp.asarray(kvl),
        jnp.asarray(pi),
        jnp.asarray(cu),
        jnp.asarray([n], jnp.int32),
    )


def check(args, dtype, *, plan=None, decode_options=None, **kw):
    sm_scale = 1.0 / np.sqrt(args[0].shape[-1])
    up = [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]
    with jax.default_matmul_precision("highest"):  # XLA's GPU default for f32 is TF32
        want, want_kv = reference.ragged_paged_attention(*up, sm_scale=sm_scale, **kw)
    if plan is None:
        got, got_kv = rpa.ragged_paged_attention(
            *args, sm_scale=sm_scale, interpret=INTERPRET, decode_options=decode_options, **kw
        )
    else:
        got_kv = kv_write.write_kv_xla(*args[1:4], *args[4:])
        got = rpa.paged_attention(
            args[0],
            got_kv,
            *args[4:],
            sm_scale=sm_scale,
            interpret=INTERPRET,
            plan=tuple(plan.items()),
            decode_options=decode_options,
            **kw,
        )
    got = np.asarray(got.astype(jnp.float32))
    want = np.asarray(want)
    assert got.shape == want.shape and not np.isnan(got).any()
    atol, rtol = TOL[dtype]
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)
    np.testing.assert_array_equal(
        np.asarray(got_kv.astype(jnp.float32)), np.asarray(want_kv.astype(jnp.float32))
    )


# Decodes first, then prefill chunks (one with earlier context, one fresh), then padding.
MIXED = dict(q_lens=[1, 1, 1, 7, 5, 9], kv_lens=[9, 30, 1, 18, 5, 9], num_tokens=28, max_seqs=8)


@pytest.mark.parametrize(
    "group,head_dim,dtype",
    [
        (1, 64, jnp.float32),
        (4, 128, jnp.bfloat16),
        (8, 64, jnp.float16),
        (4, 64, jnp.float32),
    ],
)
def test_mixed_batch(group, head_dim, dtype):
    args = make_batch(**MIXED, num_heads=2 * group, num_kv_heads=2, head_dim=head_dim, dtype=dtype)
    check(args, dtype)


@pytest.mark.parametrize(
    "sliding_window,soft_cap,dtype",
    [(5, None, jnp.float32), (None, 3.0, jnp.float32), (8, 2.0, jnp.bfloat16)],
)
def test_window_and_soft_cap(sliding_window, soft_cap, dtype):
    args = make_batch(**MIXED, num_heads=8, num_kv_heads=2, dtype=dtype, seed=1)
    check(args, dtype, sliding_window=sliding_window, soft_cap=soft_cap)


def test_token_gather():
    """The row-wise KV gather variant (plan gather="token"), mixed batch with a window."""
    args = make_batch(**MIXED, num_heads=8, num_kv_heads=2, seed=6)
    check(args, jnp.float32, plan=dict(gather="token"), sliding_window=6)


@pytest.mark.parametrize("sliding_window", [None, 11])
def test_split_k_decode(sliding_window):
    """Decode-only batch, long contexts split over 4 programs per (seq, head)."""
    args = make_batch(
        [1, 1, 1],
        [61, 17, 33],
        num_heads=8,
        num_kv_heads=2,
        page_size=4,
        pages_per_seq=16,
        num_tokens=4,
        max_seqs=4,
        seed=2,
    )
    # GPU tiles need >= 16 keys; interpret mode can take one page per block.
    plan = dict(num_splits=4, decode_block_k=4 if INTERPRET else 16)
    check(args, jnp.float32, plan=plan, sliding_window=sliding_window)


def test_large_pages_and_out_of_order_decode():
    """Pages larger than a KV block (sub-page blocks); a q_len 1 row after a prefill."""
    args = make_batch(
        [6, 1, 3],
        [40, 33, 3],
        num_heads=4,
        num_kv_heads=1,
        page_size=32,
        pages_per_seq=2,
        seed=3,
    )
    check(args, jnp.float32)


# split_mode="balanced": equal work items over the whole batch, merged by a second kernel.
# One page per KV block and one-block items in interpret mode, so sequences get several items
# (GPU tiles need >= 16 keys).
BALANCED = DecodeOptions(
    split_mode="balanced", block_k=4 if INTERPRET else 16, min_blocks_per_split=1
)


@pytest.mark.parametrize(
    "group,head_dim,dtype",
    [(1, 64, jnp.float32), (4, 128, jnp.bfloat16), (8, 64, jnp.float16)],
)
def test_balanced_mixed_batch(group, head_dim, dtype):
    """Decodes of 1-4 items each, prefill chunks and padding in one step."""
    args = make_batch(**MIXED, num_heads=2 * group, num_kv_heads=2, head_dim=head_dim, dtype=dtype)
    check(args, dtype, decode_options=BALANCED)


@pytest.mark.parametrize(
    "sliding_window,soft_cap,dtype", [(5, None, jnp.float32), (13, 2.0, jnp.bfloat16)]
)
def test_balanced_window_and_soft_cap(sliding_window, soft_cap, dtype):
    args = make_batch(**MIXED, num_heads=8, num_kv_heads=2, dtype=dtype, seed=7)
    opts = dataclasses.replace(BALANCED, longest_first=False)
    check(args, dtype, decode_options=opts, sliding_window=sliding_window, soft_cap=soft_cap)


@pytest.mark.parametrize("programs_per_core,longest_first", [(1, True), (8, True), (4, False)])
def test_balanced_random_lengths(programs_per_core, longest_first):
    """Random lengths (mostly not page multiples), then a prefill chunk, then padding rows."""
    rng = np.random.default_rng(programs_per_core)
    kv_lens = [int(x) for x in rng.integers(1, 65, 7)] + [12]
    args = make_batch(
        [1] * 7 + [5],
        kv_lens,
        num_heads=8,
        num_kv_heads=2,
        page_size=4,
        pages_per_seq=16,
        num_tokens=16,
        max_seqs=10,
        seed=8,
    )
    opts = dataclasses.replace(
        BALANCED, programs_per_core=programs_per_core, longest_first=longest_first
    )
    check(args, jnp.float32, plan={}, decode_options=opts)


def test_balanced_large_pages():
    """Pages larger than a KV block; a sequence of one token; a q_len 1 row after a prefill."""
    args = make_batch(
        [1, 1, 1, 6, 1],
        [70, 1, 33, 40, 3],
        num_heads=4,
        num_kv_heads=1,
        page_size=32,
        pages_per_seq=3,
        seed=9,
    )
    check(args, jnp.float32, decode_options=BALANCED)


@pytest.mark.parametrize("sliding_window", [None, 20])
def test_balance_work_items(sliding_window):
    """Items cover each decode's blocks exactly, are <= bps blocks, fit the static grid."""
    rng = np.random.default_rng(10)
    S, BK, P, target, min_blocks = 24, 16, 32, 6, 2
    for trial in range(20):
        kv = rng.integers(0, P * 4 + 1, S) if trial % 2 else np.full(S, P * 4)
        num_dec = int(rng.integers(0, S + 1))
        meta = np.asarray(
            decode.balance_work(
                jnp.asarray(kv, jnp.int32),
                jnp.asarray([num_dec], jnp.int32),
                num_seqs=S,
                block_k=BK,
                sliding_window=sliding_window,
                target_items=target,
                min_blocks=min_blocks,
                longest_first=bool(trial % 3),
            )
        )
        cum, order, count, kvs = meta[:, :S]
        assert sorted(order) == list(range(S)) and (kvs == kv[order]).all()
        lo = np.maximum(kv - (sliding_window or 10**9), 0) // BK
        n = np.where(np.arange(S) < num_dec, -(-kv // BK) - lo, 0)
        bps = max(min_blocks, -(-n.sum() // target))
        np.testing.assert_array_equal(count, -(-n[order] // bps))
        np.testing.assert_array_equal(cum, np.cumsum(count))
        assert cum[-1] <= decode.num_work_items(S, -(-P * 4 // BK), target, min_blocks)
        assert (meta[0, S:] == np.iinfo(np.int32).max).all()


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_kv_write(impl):
    args = make_batch(**MIXED, num_heads=8, num_kv_heads=2, dtype=jnp.bfloat16, seed=4)
    want = reference.write_kv(*args[1:])
    if impl == "xla":
        got = kv_write.write_kv_xla(*args[1:])
    else:
        got = kv_write.write_kv_pallas(*args[1:], interpret=INTERPRET)
    np.testing.assert_array_equal(
        np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))
    )


def test_unsupported_shape_falls_back():
    """Head dim 80 is no Triton tile: the call goes to the reference, still correct."""
    args = make_batch([1, 3], [5, 3], num_heads=4, num_kv_heads=2, head_dim=80, seed=5)
    with jax.default_matmul_precision("highest"):  # the fallback is plain XLA
        check(args, jnp.float32)


def test_no_live_sequences():
    args = make_batch([3], [3], num_tokens=8, max_seqs=2)
    args = args[:-1] + (jnp.asarray([0], jnp.int32),)
    sm_scale = 0.125
    got, _ = rpa.ragged_paged_attention(*args, sm_scale=sm_scale, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(got), 0.0)
