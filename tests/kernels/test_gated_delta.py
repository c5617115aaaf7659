"""Gated delta rule kernels against the plain recurrence (and it against transformers')."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmm.kernels import gated_delta as gd

TOL = dict(atol=2e-5, rtol=2e-5)
# jitted: eager op-by-op dispatch costs more than compiling these tiny programs
reference = jax.jit(gd.gated_delta_reference)
chunked = jax.jit(gd.gated_delta_chunked, static_argnames="chunk")
conv1d = jax.jit(gd.causal_conv1d)


def _inputs(rs, L, N, Hk=8, Hv=6):
    q = gd.l2norm(jnp.asarray(rs.randn(L, N, Hk), jnp.float32)) * Hk**-0.5
    k = gd.l2norm(jnp.asarray(rs.randn(L, N, Hk), jnp.float32))
    v = jnp.asarray(rs.randn(L, N, Hv), jnp.float32)
    g = jnp.asarray(-np.abs(rs.randn(L, N)) * 0.5, jnp.float32)  # log-decay <= 0
    beta = jnp.asarray(1 / (1 + np.exp(-rs.randn(L, N))), jnp.float32)
    state = jnp.asarray(rs.randn(N, Hk, Hv) * 0.3, jnp.float32)
    return q, k, v, g, beta, state


def test_reference_matches_transformers_recurrence():
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    rs = np.random.RandomState(0)
    L, Nk, N, Hk, Hv = 9, 2, 4, 8, 6
    q, k = rs.randn(1, L, Nk, Hk), rs.randn(1, L, Nk, Hk)
    v, a, b = rs.randn(1, L, N, Hv), rs.randn(1, L, N), rs.randn(1, L, N)
    g, beta = -np.log1p(np.exp(a)), 1 / (1 + np.exp(-b))
    state = rs.randn(1, N, Hk, Hv) * 0.3
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    ref_out, ref_state = torch_recurrent_gated_delta_rule(
        t(q),
        t(k),
        t(v),
        g=t(g),
        beta=t(beta),
        initial_state=t(state),
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    rep = lambda x: jnp.repeat(jnp.asarray(x[0], jnp.float32), N // Nk, axis=1)  # noqa: E731
    out, st = reference(
        gd.l2norm(rep(q)) * Hk**-0.5, gd.l2norm(rep(k)), v[0], g[0], beta[0], state[0]
    )
    np.testing.assert_allclose(out, ref_out[0].numpy(), **TOL)
    np.testing.assert_allclose(st, ref_state[0].numpy(), **TOL)


@pytest.mark.parametrize("L,chunk,N", [(1, 16, 1), (5, 4, 3), (37, 16, 3), (70, 64, 1)])
def test_chunked_matches_reference(L, chunk, N):
    args = _inputs(np.random.RandomState(L), L, N)
    out, st = chunked(*args, chunk=chunk)
    ref_out, ref_st = reference(*args)
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(st, ref_st, **TOL)


def test_chunked_carries_state_across_calls():
    q, k, v, g, beta, s0 = _inputs(np.random.RandomState(1), 29, 2)
    ref_out, ref_st = reference(q, k, v, g, beta, s0)
    o1, s1 = chunked(q[:11], k[:11], v[:11], g[:11], beta[:11], s0, chunk=8)
    o2, s2 = chunked(q[11:], k[11:], v[11:], g[11:], beta[11:], s1, chunk=8)
    np.testing.assert_allclose(jnp.concatenate([o1, o2]), ref_out, **TOL)
    np.testing.assert_allclose(s2, ref_st, **TOL)


def test_step_matches_reference():
    q, k, v, g, beta, s0 = _inputs(np.random.RandomState(2), 3, 2)
    ref_out, ref_st = reference(q, k, v, g, beta, s0)
    S = s0[None]
    for t in range(3):
        one = [a[t : t + 1] for a in (q, k, v, g, beta)]
        o, S = gd.gated_delta_step(*one, S)
        np.testing.assert_allclose(o[0], ref_out[t], **TOL)
    np.testing.assert_allclose(S[0], ref_st, **TOL)


def test_conv1d_matches_transformers_and_carries_state():
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_5.modeling_qwen3_5 import causal_conv1d_fn

    rs = np.random.RandomState(3)
    L, E, W = 11, 5, 4
    x, w = rs.randn(L, E).astype(np.float32), rs.randn(E, W).astype(np.float32)
    ref = causal_conv1d_fn(torch.tensor(x.T[None]), torch.tensor(w), None, activation="silu")
    zero = jnp.zeros((W - 1, E))
    out, st = conv1d(jnp.asarray(x), jnp.asarray(w), zero)
    np.testing.assert_allclose(out, ref[0].numpy().T, **TOL)
    np.testing.assert_allclose(st, x[-(W - 1) :])
    o1, s1 = conv1d(jnp.asarray(x[:2]), jnp.asarray(w), zero)  # shorter than W - 1
    o2, _ = conv1d(jnp.asarray(x[2:]), jnp.asarray(w), s1)
    np.testing.assert_allclose(jnp.concatenate([o1, o2]), out, **TOL)


def _ragged_case(rs, lens, starts, T, N=3, E=7, W=4, n_slots=5):
    """Rows of `lens` new tokens; a row with start > 0 continues its slot's state."""
    S = len(lens) + 2  # two padding rows
    total = sum(lens)
    q, k, v, g, beta, _ = _inputs(rs, T, N)
    x = jnp.asarray(rs.randn(T, E), jnp.float32)
    w = jnp.asarray(rs.randn(E, W), jnp.float32)
    states = jnp.asarray(rs.randn(n_slots + 1, N, 8, 6) * 0.3, jnp.float32)
    conv = jnp.asarray(rs.randn(n_slots + 1, W - 1, E), jnp.float32)
    slots = np.full(S, n_slots, np.int32)
    slots[: len(lens)] = rs.permutation(n_slots)[: len(lens)]
    cu = np.full(S + 1, total, np.int32)
    cu[: len(lens) + 1] = np.concatenate([[0], np.cumsum(lens)])
    has = np.zeros(S, bool)
    has[: len(lens)] = np.array(starts) > 0
    return (q, k, v, g, beta), x, w, states, conv, slots, cu, has


@pytest.mark.parametrize(
    "lens,starts,chunk",
    [
        ([1, 1, 1], [5, 0, 9], 8),  # decodes only (one starting fresh)
        ([1, 19, 1, 4], [3, 0, 7, 2], 8),  # mixed, odd lengths, a chunk carried in
        ([33], [10], 16),  # one long prefill chunk with state
    ],
)
def test_ragged_matches_per_sequence(lens, starts, chunk):
    rs = np.random.RandomState(sum(lens))
    T = 48
    qkv, x, w, states, conv, slots, cu, has = _ragged_case(rs, lens, starts, T)
    out, new_states = jax.jit(gd.ragged_gated_delta, static_argnames="chunk")(
        *qkv, states, slots, cu, has, chunk=chunk
    )
    cout, new_conv = jax.jit(gd.ragged_conv1d)(x, w, conv, slots, cu, has)
    spare = states.shape[0] - 1
    for i in range(len(lens)):
        a, b, s = cu[i], cu[i + 1], slots[i]
        s0 = states[s] if has[i] else jnp.zeros_like(states[s])
        ref_out, ref_st = reference(*(t[a:b] for t in qkv), s0)
        np.testing.assert_allclose(out[a:b], ref_out, **TOL)
        np.testing.assert_allclose(new_states[s], ref_st, **TOL)
        c0 = conv[s] if has[i] else jnp.zeros_like(conv[s])
        ref_c, ref_cs = conv1d(x[a:b], w, c0)
        np.testing.assert_allclose(cout[a:b], ref_c, **TOL)
        np.testing.assert_allclose(new_conv[s], ref_cs, **TOL)
    untouched = [s for s in range(spare) if s not in slots[: len(lens)]]
    np.testing.assert_array_equal(new_states[np.array(untouched)], states[np.array(untouched)])
    np.testing.assert_array_equal(new_conv[np.array(untouched)], conv[np.array(untouched)])


def test_ragged_one_token_step():
    """A step of exactly one token (one decode, no padding) traces and matches the oracle."""
    rs = np.random.RandomState(3)
    qkv, _, _, states, _, slots, cu, has = _ragged_case(rs, [1], [4], 1)
    out, new_states = jax.jit(gd.ragged_gated_delta, static_argnames="chunk")(
        *qkv, states, slots, cu, has, chunk=8
    )
    ref_out, ref_st = reference(*qkv, states[slots[0]])
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(new_states[slots[0]], ref_st, **TOL)
