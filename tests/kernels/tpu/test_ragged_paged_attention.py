"""The Pallas TPU ragged paged attention kernel vs the pure-JAX reference, in TPU interpret mode.

No TPU is needed: `interpret=True` runs the Mosaic kernel on CPU, simulating VMEM, SMEM, DMAs
and semaphores (uninitialized VMEM reads as NaN). Batches come from the GPU kernel tests'
`make_batch`: kv lengths that are not multiples of the page size, garbage page-table entries
past each sequence's pages, and NaN in every slot nothing has written, so a stray read shows
up as NaN. Small tile overrides (`block_q`, `block_kv`) make short batches span several query
and KV blocks, which is where the ragged bookkeeping and the double buffer can go wrong.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxmm.kernels import reference
from jaxmm.kernels.tpu import ragged_paged_attention as tpu
from tests.kernels.gpu.test_ragged_paged_attention import TOL, make_batch

# Decodes first (one with a 61-token context), a live sequence with no new tokens, a prefill
# chunk of 24 after 46 cached tokens, two fresh prefills, then padding (48 - 41 tokens).
MIXED = dict(
    q_lens=[1, 1, 1, 0, 24, 5, 9],
    kv_lens=[9, 61, 1, 7, 70, 5, 9],
    num_tokens=48,
    max_seqs=8,
    page_size=16,
    pages_per_seq=6,
)
SMALL = dict(block_q=16, block_kv=32)  # 3 query blocks, up to 3 KV blocks per sequence


def check(args, dtype, **kw):
    sm_scale = 1.0 / np.sqrt(args[0].shape[-1])
    opts = {k: kw.pop(k) for k in ("sliding_window", "soft_cap") if k in kw}
    up = [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]
    with jax.default_matmul_precision("highest"):
        want, want_kv = reference.ragged_paged_attention(*up, sm_scale=sm_scale, **opts)
    kw.setdefault("interpret", True)
    got, got_kv = tpu.ragged_paged_attention(*args, sm_scale=sm_scale, **opts, **kw)
    got = np.asarray(got.astype(jnp.float32))
    assert got.shape == want.shape and not np.isnan(got).any()
    atol, rtol = TOL[dtype]
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)
    np.testing.assert_array_equal(
        np.asarray(got_kv.astype(jnp.float32)), np.asarray(want_kv.astype(jnp.float32))
    )


@pytest.fixture(autouse=True)
def _reset_interpreter():
    yield
    pltpu.reset_tpu_interpret_mode_state()  # a kernel that raised leaves shared state behind


@pytest.mark.parametrize(
    "group,head_dim,dtype,blocks",
    [
        (1, 64, jnp.float32, SMALL),
        (4, 128, jnp.bfloat16, SMALL),
        (8, 64, jnp.bfloat16, {}),  # default tiles: one query block, one KV block per seq
        (4, 64, jnp.float32, dict(block_q=32, block_kv=16)),  # one page per KV block
        (8, 128, jnp.float16, SMALL),
    ],
)
def test_mixed_batch(group, head_dim, dtype, blocks):
    args = make_batch(**MIXED, num_heads=2 * group, num_kv_heads=2, head_dim=head_dim, dtype=dtype)
    check(args, dtype, **blocks)


@pytest.mark.parametrize(
    "sliding_window,soft_cap,dtype,blocks",
    [
        (5, None, jnp.float32, SMALL),  # window < page: whole KV blocks are skipped
        (None, 3.0, jnp.bfloat16, {}),
        (20, 2.0, jnp.float32, dict(block_q=16, block_kv=16)),
    ],
)
def test_window_and_soft_cap(sliding_window, soft_cap, dtype, blocks):
    args = make_batch(**MIXED, num_heads=8, num_kv_heads=2, dtype=dtype, seed=1)
    check(args, dtype, sliding_window=sliding_window, soft_cap=soft_cap, **blocks)


@pytest.mark.parametrize("sliding_window", [None, 24])
def test_decode_only_long_context(sliding_window):
    """16 decodes in one query block; contexts of up to 7 KV blocks, eager DMAs."""
    kv_lens = [97, 17, 33, 64, 1, 50, 80, 16, 15, 2, 99, 31, 48, 66, 70, 5]
    args = make_batch(
        [1] * 16,
        kv_lens,
        num_heads=4,
        num_kv_heads=4,
        head_dim=128,
        page_size=16,
        pages_per_seq=7,
        num_tokens=16,
        max_seqs=16,
        dtype=jnp.bfloat16,
        seed=2,
    )
    eager = pltpu.InterpretParams(dma_execution_mode="eager")
    check(args, jnp.bfloat16, sliding_window=sliding_window, block_kv=16, interpret=eager)


def test_no_live_sequences():
    args = make_batch([3], [3], num_tokens=16, max_seqs=2, page_size=16)
    args = args[:-1] + (jnp.asarray([0], jnp.int32),)
    got, kv = tpu.ragged_paged_attention(*args, sm_scale=0.125, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), 0.0)
    np.testing.assert_array_equal(np.asarray(kv), np.asarray(args[3]))


def test_unsupported_head_dim_falls_back_to_xla():
    args = make_batch([1, 3], [5, 3], num_heads=4, num_kv_heads=2, head_dim=192, page_size=16)
    with jax.default_matmul_precision("highest"):
        check(args, jnp.float32)


@pytest.mark.parametrize(
    "dtype,group,head_dim,kw",
    [
        (jnp.bfloat16, 4, 128, {}),
        (jnp.float32, 1, 64, dict(sliding_window=20, soft_cap=2.0)),
    ],
)
def test_lowers_to_mosaic(dtype, group, head_dim, kw):
    """Lowering for TPU on a CPU host: every op in the kernel has a Mosaic lowering rule and
    the block shapes pass Pallas' TPU checks (Mosaic's own compile is not run: no libtpu)."""
    args = make_batch(**MIXED, num_heads=2 * group, num_kv_heads=2, head_dim=head_dim, dtype=dtype)
    fn = jax.jit(functools.partial(tpu.ragged_paged_attention, sm_scale=0.1, **kw))
    text = jax.export.export(fn, platforms=["tpu"])(*args).mlir_module()
    assert "tpu_custom_call" in text


def test_engine_greedy_matches_transformers(ckpt_root):
    """A tiny Llama through the engine on the interpreted TPU kernel: chunked prefills
    (16-token budget), then decodes; greedy tokens equal transformers'."""
    from jaxmm import LLM, SamplingParams
    from tests.helpers import hf_greedy, make_checkpoint

    path = make_checkpoint(ckpt_root, "llama")
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=64,
        max_num_batched_tokens=16,
        attention_backend="pallas_tpu",
    )
    assert llm.llm_engine.runner.backend == "pallas_tpu"
    tok = llm.get_tokenizer()
    prompts = ["Hello, my name is", "The capital of France is Paris. The capital of Italy", "JAX"]
    ids = [tok(p).input_ids for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, ids, 8)
