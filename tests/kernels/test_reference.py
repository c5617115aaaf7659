"""The reference attention against a naive per-sequence softmax, and the XLA path against it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmm.kernels import reference, xla


def naive(q, kv_ctx_k, kv_ctx_v, start, scale, window=None, soft_cap=None):
    """One sequence: q (n, N, H) at positions start..start+n-1 over keys (L, K, H)."""
    n, N, H = q.shape
    L, K, _ = kv_ctx_k.shape
    g = N // K
    out = np.zeros_like(q)
    for t in range(n):
        p = start + t
        for h in range(N):
            kk = kv_ctx_k[: p + 1, h // g]
            s = kk @ q[t, h] * scale
            if soft_cap:
                s = soft_cap * np.tanh(s / soft_cap)
            if window:
                s[: max(0, p - window + 1)] = -np.inf
            w = np.exp(s - s.max())
            w /= w.sum()
            out[t, h] = w @ kv_ctx_v[: p + 1, h // g]
    return out


def make_case(rng, q_lens, kv_lens, N, K, H, G, A, P, dtype=np.float32):
    S = len(q_lens)
    T = sum(q_lens) + 3  # trailing padding tokens
    kv_pages = np.full((2, K, A, G, H), np.nan, dtype)  # unused slots are NaN: stray reads fail
    full_k, full_v, tables = [], [], []
    free = list(rng.permutation(A))
    for s in range(S):
        L = kv_lens[s]
        fk = rng.standard_normal((L, K, H)).astype(dtype)
        fv = rng.standard_normal((L, K, H)).astype(dtype)
        pages = [free.pop() for _ in range(-(-L // G))]
        ctx = L - q_lens[s]
        for i in range(ctx):
            kv_pages[0, :, pages[i // G], i % G] = fk[i]
            kv_pages[1, :, pages[i // G], i % G] = fv[i]
        full_k.append(fk)
        full_v.append(fv)
        tables.append(pages + [0] * (P - len(pages)))
    q = rng.standard_normal((T, N, H)).astype(dtype)
    k = np.zeros((T, K, H), dtype)
    v = np.zeros((T, K, H), dtype)
    cu = np.zeros(S + 1, np.int32)
    t = 0
    for s in range(S):
        n = q_lens[s]
        k[t : t + n] = full_k[s][kv_lens[s] - n :]
        v[t : t + n] = full_v[s][kv_lens[s] - n :]
        t += n
        cu[s + 1] = t
    args = (
        q,
        k,
        v,
        kv_pages,
        np.array(kv_lens, np.int32),
        np.array(tables, np.int32),
        cu,
        np.array([S], np.int32),
    )
    return args, full_k, full_v


CASES = [
    # (q_lens, kv_lens): decodes first, then prefill chunks with earlier context
    ([1, 1, 1], [5, 17, 33]),
    ([1, 7, 16], [40, 7, 45]),
    ([1, 1, 20, 3], [16, 1, 20, 50]),
]


@pytest.mark.parametrize("impl", [reference, xla])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("N,K", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("window,soft_cap", [(None, None), (6, None), (None, 5.0)])
def test_against_naive(impl, case, N, K, window, soft_cap):
    rng = np.random.default_rng(0)
    q_lens, kv_lens = case
    H, G, A, P = 16, 4, 40, 16
    args, fk, fv = make_case(rng, q_lens, kv_lens, N, K, H, G, A, P)
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 for f32 matmuls
        out, pages = jax.jit(
            lambda *a: impl.ragged_paged_attention(
                *a, sm_scale=H**-0.5, sliding_window=window, soft_cap=soft_cap
            )
        )(*args)
    out = np.asarray(out)
    t = 0
    for s, n in enumerate(q_lens):
        want = naive(args[0][t : t + n], fk[s], fv[s], kv_lens[s] - n, H**-0.5, window, soft_cap)
        np.testing.assert_allclose(out[t : t + n], want, atol=2e-5, rtol=1e-5)
        t += n
    assert np.all(out[t:] == 0)  # padding tokens
    # the new keys landed in their pages
    pages = np.asarray(pages)
    tables = args[5]
    for s in range(len(q_lens)):
        L = kv_lens[s]
        for i in range(L - q_lens[s], L):
            np.testing.assert_array_equal(pages[0, :, tables[s][i // G], i % G], fk[s][i])


def test_xla_bf16_close_to_reference():
    rng = np.random.default_rng(1)
    args, _, _ = make_case(rng, [1, 1, 9], [30, 3, 40], 8, 2, 64, 16, 12, 4)
    args = list(args)
    for i in (0, 1, 2, 3):
        args[i] = jnp.asarray(args[i], jnp.bfloat16)
    ref, _ = reference.ragged_paged_attention(*args, sm_scale=0.125)
    got, _ = xla.ragged_paged_attention(*args, sm_scale=0.125)
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2
    )
