"""Pallas gated-delta kernels (decode: GPU Triton and TPU Mosaic; prefill chunks: GPU Triton;
interpret mode on CPU) against their pure-JAX references, and the ragged entry point on them
against the plain recurrence.

On a GPU, `JAXMM_NATIVE_KERNELS=1` runs the GPU kernels compiled instead (the ragged tests
take the platform's kernels anyway). Every batch has padding rows and fresh rows whose slots
hold NaN (a fresh row must not read its slot); slots no live row owns must come back
bit-for-bit unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmm.kernels import gated_delta as gd
from jaxmm.kernels import gated_delta_pallas as gp
from jaxmm.kernels import gated_delta_tpu as gt

TOL = dict(atol=2e-5, rtol=2e-5)
INTERPRET = os.environ.get("JAXMM_NATIVE_KERNELS") != "1"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rows(rs, S, N, Hk, Hv):
    q = gd.l2norm(jnp.asarray(rs.randn(S, N, Hk), jnp.float32)) * Hk**-0.5
    k = gd.l2norm(jnp.asarray(rs.randn(S, N, Hk), jnp.float32))
    v = jnp.asarray(rs.randn(S, N, Hv), jnp.float32)
    g = jnp.asarray(-np.abs(rs.randn(S, N)) * 0.5, jnp.float32)
    beta = jnp.asarray(1 / (1 + np.exp(-rs.randn(S, N))), jnp.float32)
    return q, k, v, g, beta


def _decode_case(S, N, Hk, Hv, n_pad, seed=0):
    """S rows: n_pad of them padding (alternately slot -1 and the scratch slot, which a live
    padding row may scribble on), the rest on distinct slots, every other one fresh on a
    NaN slot."""
    rs = np.random.RandomState(seed)
    n_slots = S + 2
    states = rs.randn(n_slots + 1, N, Hk, Hv).astype(np.float32) * 0.3
    real = S - n_pad
    slots = np.empty(S, np.int32)
    slots[:real] = rs.permutation(n_slots)[:real]
    slots[real:] = [-1 if i % 2 == 0 else n_slots for i in range(n_pad)]
    has = np.ones(S, bool)
    has[1:real:2] = False
    states[slots[1:real:2]] = np.nan
    return _rows(rs, S, N, Hk, Hv), jnp.asarray(states), jnp.asarray(slots), jnp.asarray(has)


def _check_decode(fn, S, N, Hk, Hv, n_pad, **kw):
    rows, states, slots, has = _decode_case(S, N, Hk, Hv, n_pad, seed=S + N + Hk)
    ref_out, ref_states = gp.decode_reference(*rows, states, slots, has)
    out, new = fn(*rows, states, slots, has, **kw)
    real = S - n_pad
    np.testing.assert_allclose(out[:real], ref_out[:real], **TOL)
    skipped = np.asarray(slots) < 0
    np.testing.assert_array_equal(np.asarray(out)[skipped], 0.0)
    live = np.asarray(slots[:real])
    np.testing.assert_allclose(new[live], ref_states[live], **TOL)
    spare = states.shape[0] - 1
    untouched = np.array([s for s in range(spare) if s not in live])
    np.testing.assert_array_equal(new[untouched], states[untouched])


# (S rows, N value heads, Hk, Hv, padding rows)
GRID = [(3, 1, 16, 16, 0), (5, 3, 32, 8, 2), (4, 2, 8, 64, 1)]


@pytest.mark.parametrize("S,N,Hk,Hv,n_pad", GRID)
def test_gpu_decode_matches_reference(S, N, Hk, Hv, n_pad):
    _check_decode(gp.gated_delta_decode_gpu, S, N, Hk, Hv, n_pad, block_v=16, interpret=INTERPRET)


@pytest.mark.parametrize("S,N,Hk,Hv,n_pad", GRID)
def test_tpu_decode_matches_reference(S, N, Hk, Hv, n_pad):
    _check_decode(gt.gated_delta_decode_tpu, S, N, Hk, Hv, n_pad, interpret=True)


def test_tpu_decode_several_head_blocks():
    # 4 heads in blocks of 2: the grid's second axis walks head blocks of the same slot
    _check_decode(gt.gated_delta_decode_tpu, 3, 4, 8, 16, 1, heads=2, interpret=True)


def test_gpu_decode_odd_head_sizes_take_the_reference():
    assert not gp.gpu_supported(8, 6)
    _check_decode(gp.gated_delta_decode_gpu, 3, 2, 8, 6, 1, interpret=INTERPRET)


def test_decode_reference_matches_recurrence():
    # the oracle of the kernels against the plain recurrence, one token of one slot
    (q, k, v, g, beta), states, slots, has = _decode_case(2, 2, 8, 8, 0)
    out, new = gp.decode_reference(q, k, v, g, beta, states, slots, has)
    s0 = int(slots[0])
    ref_out, ref_st = gd.gated_delta_reference(q[:1], k[:1], v[:1], g[:1], beta[:1], states[s0])
    np.testing.assert_allclose(out[0], ref_out[0], **TOL)
    np.testing.assert_allclose(new[s0], ref_st, **TOL)


def _check_chunks(fn, **kw):
    """Rows of 2, 0 and 3 chunks and a padding row, one chunk past the real ones; one row
    continues its slot, one starts fresh on a NaN slot."""
    rs = np.random.RandomState(4)
    N, C, Hk, Hv, n_slots = 2, 16, 16, 32, 5
    lens = [2 * C, 0, 3 * C - 5, 0]
    first = np.concatenate([[0], np.cumsum([-(-n // C) for n in lens])]).astype(np.int32)
    NC = int(first[-1]) + 1  # one spare chunk past the real ones
    q, k, v, g, beta = (a.reshape(NC, C, *a.shape[1:]) for a in _rows(rs, NC * C, N, Hk, Hv))
    prep = gd._chunk_prep(q, k, v, g, beta)
    states = rs.randn(n_slots + 1, N, Hk, Hv).astype(np.float32) * 0.3
    slots = np.array([4, 1, 0, n_slots], np.int32)
    has = np.array([True, True, False, False])
    states[0] = np.nan
    states = jnp.asarray(states)
    ref_out, ref_states = gp.chunks_reference(*prep, states, slots, has, first)
    out, new = fn(*prep, states, slots, has, first, **kw)
    real = int(first[-1])
    np.testing.assert_allclose(out[:real], ref_out[:real], **TOL)
    np.testing.assert_allclose(new[np.array([4, 0])], ref_states[np.array([4, 0])], **TOL)
    np.testing.assert_array_equal(new[np.array([1, 2, 3])], states[np.array([1, 2, 3])])


def test_gpu_chunks_match_reference():
    # Hv 32 in two column blocks per head
    _check_chunks(gp.gated_delta_chunks_gpu, block_v=16, interpret=INTERPRET)


def test_tpu_chunks_match_reference():
    _check_chunks(gt.gated_delta_chunks_tpu, interpret=True)


@pytest.mark.parametrize(
    "lens,starts,chunk,platform",
    [
        ([1, 1, 1], [5, 0, 9], 16, None),  # decodes only (one fresh): no prefill loop
        ([1, 19, 1, 4], [3, 0, 7, 2], 16, None),  # mixed, odd lengths, a chunk carried in
        ([1, 19, 1, 4], [3, 0, 7, 2], 16, "tpu"),  # the same on the TPU kernels
    ],
)
def test_ragged_pallas_matches_per_sequence(lens, starts, chunk, platform):
    rs = np.random.RandomState(sum(lens))
    T, N, Hk, Hv, n_slots = 32, 2, 16, 16, 6
    S = len(lens) + 2  # two padding rows
    q, k, v, g, beta = _rows(rs, T, N, Hk, Hv)
    states = rs.randn(n_slots + 1, N, Hk, Hv).astype(np.float32) * 0.3
    slots = np.full(S, n_slots, np.int32)
    slots[: len(lens)] = rs.permutation(n_slots)[: len(lens)]
    cu = np.full(S + 1, sum(lens), np.int32)
    cu[: len(lens) + 1] = np.concatenate([[0], np.cumsum(lens)])
    has = np.zeros(S, bool)
    has[: len(lens)] = np.array(starts) > 0
    states[slots[: len(lens)][~has[: len(lens)]]] = np.nan  # fresh rows never read these
    states = jnp.asarray(states)
    if platform is None:  # through the backend switch, on this platform's kernels
        run = jax.jit(gd.ragged_gated_delta, static_argnames=("chunk", "backend"))
        out, new = run(q, k, v, g, beta, states, slots, cu, has, chunk=chunk, backend="pallas")
    else:
        run = jax.jit(gp.ragged_gated_delta_pallas, static_argnames=("chunk", "platform"))
        out, new = run(q, k, v, g, beta, states, slots, cu, has, chunk=chunk, platform=platform)
    for i in range(len(lens)):
        a, b, s = cu[i], cu[i + 1], slots[i]
        s0 = states[s] if has[i] else jnp.zeros_like(states[s])
        ref_out, ref_st = gd.gated_delta_reference(q[a:b], k[a:b], v[a:b], g[a:b], beta[a:b], s0)
        np.testing.assert_allclose(out[a:b], ref_out, **TOL)
        np.testing.assert_allclose(new[s], ref_st, **TOL)
    untouched = np.array([s for s in range(n_slots) if s not in slots[: len(lens)]])
    np.testing.assert_array_equal(new[untouched], states[untouched])


def test_backend_switch_rejects_unknown(monkeypatch):
    monkeypatch.setenv(gd.BACKEND_ENV, "cuda")
    z = jnp.zeros((2, 1, 4))
    with pytest.raises(ValueError, match="backend"):
        gd.ragged_gated_delta(
            z, z, z, z[..., 0], z[..., 0], jnp.zeros((2, 1, 4, 4)),
            jnp.zeros(1, jnp.int32), jnp.array([0, 2]), jnp.zeros(1, bool),
        )  # fmt: skip


def test_benchmark_smoke():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "benchmarks/gated_delta_kernel.py", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "gated_delta_kernel"
    decode = result["decode"]
    assert [r["batch"] for r in decode] == [1, 2]
    for r in decode:
        assert r["max_abs_diff"] < 1e-4  # the kernel agreed with XLA before it was timed
        assert r["xla_us"] > 0 and r["pallas_us"] > 0
