"""The gated delta rule (Gated DeltaNet's token mixer) and its short causal convolution.

Per value head, a state `S (Hk, Hv)` is decayed, corrected toward the new value and read:

    S_t = exp(g_t) * S_{t-1}
    S_t = S_t + beta_t * k_t (v_t - k_t^T S_t)^T      (the delta rule: write the error only)
    o_t = S_t^T q_t

Shapes (docs/shapes.md letters, plus the two head dimensions of linear attention):
q, k `(T, N, Hk)`, v `(T, N, Hv)`, g, beta `(T, N)`, state `(N, Hk, Hv)`; N counts value
heads (grouped key heads are repeated to N before these functions). Everything runs in
float32; q arrives already normalised and scaled, k normalised.

1. `gated_delta_reference`: the plain recurrence, one token at a time (the oracle).
2. `gated_delta_chunked`: the chunkwise WY form for prefill: within a chunk of C tokens the
   C delta-rule updates are condensed by one unit-lower-triangular solve (the UT transform)
   into `u = A^-1 (beta v)` and `w = A^-1 (beta k exp(cumsum g))`, so the chunk costs a few
   matmuls; only the chunk-to-chunk state hand-off is sequential.
3. `gated_delta_step`: one token per row, for decode.
4. `causal_conv1d`: depthwise causal convolution with K taps whose last K - 1 inputs carry
   over as the conv state.

The engine's entry points (`ragged_conv1d`, `ragged_gated_delta`) take a whole step's ragged
batch: tokens flattened over sequences (`cu_q_lens`), each sequence reading and writing its
own slot of the state arrays `(slots + 1, ...)` (the last slot is scratch for padding rows).
A sequence whose chunk starts at position 0 starts from a zero state whatever its slot held,
so slots need no clearing when they change hands. Single-token rows take the decode update,
vectorised over the batch; longer rows are cut into chunks aligned to each sequence's start
and take the WY form, with a loop over the step's real chunks only.

Backends of `ragged_gated_delta` (argument `backend`, else the JAXMM_GATED_DELTA_BACKEND
environment variable, read when the step is traced): "xla" (default) runs the code below;
"pallas" runs the single-token rows on the in-place Pallas decode kernel and the prefill
chunks on the Pallas chunk kernel (`gated_delta_pallas.py`, `gated_delta_tpu.py`; interpret
mode off GPU/TPU).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

f32 = jnp.float32
BACKEND_ENV = "JAXMM_GATED_DELTA_BACKEND"
BACKENDS = ("xla", "pallas")


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(sum(x^2) + eps) over the last axis, in float32 (as the reference library)."""
    x = x.astype(f32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


# -- 1. the reference recurrence ---------------------------------------------------------------
def gated_delta_reference(q, k, v, g, beta, state):
    """One sequence, token by token. q, k (L, N, Hk), v (L, N, Hv), g, beta (L, N), state
    (N, Hk, Hv) -> out (L, N, Hv), final state."""

    def one(S, xs):
        qt, kt, vt, gt, bt = xs
        S = S * jnp.exp(gt)[:, None, None]
        kv_mem = jnp.einsum("NKV,NK->NV", S, kt)
        delta = (vt - kv_mem) * bt[:, None]
        S = S + kt[:, :, None] * delta[:, None, :]
        return S, jnp.einsum("NKV,NK->NV", S, qt)

    xs = tuple(a.astype(f32) for a in (q, k, v, g, beta))
    state, out = jax.lax.scan(one, state.astype(f32), xs)
    return out, state


# -- 2. the chunkwise WY form -----------------------------------------------------------------
def _chunk_prep(q, k, v, g, beta):
    """Per-chunk quantities of the WY form, batched over leading axes.

    q, k (..., C, N, Hk), v (..., C, N, Hv), g, beta (..., C, N), padding positions with
    k = v = g = beta = 0 (they leave the state unchanged). Returns, head-major:
    u (..., N, C, Hv) new values, w (..., N, C, Hk) decayed keys that read the old state,
    attn (..., N, C, C) intra-chunk scores, qd (..., N, C, Hk) queries decayed from the chunk
    start, kd (..., N, C, Hk) keys decayed to the chunk end, decay (..., N) whole-chunk decay.
    """
    C = q.shape[-3]
    heads_first = lambda x: jnp.swapaxes(x, -3, -2).astype(f32)  # noqa: E731
    q, k, v = heads_first(q), heads_first(k), heads_first(v)  # (..., N, C, H)
    g, beta = jnp.swapaxes(g, -1, -2).astype(f32), jnp.swapaxes(beta, -1, -2).astype(f32)
    cum = jnp.cumsum(g, axis=-1)  # (..., N, C) log-decay from the chunk start
    lower = jnp.tril(jnp.ones((C, C), bool))
    # exp(cum_i - cum_j) for j <= i; masked before exp so nothing overflows
    pair = jnp.exp(jnp.where(lower, cum[..., :, None] - cum[..., None, :], -jnp.inf))
    k_beta = k * beta[..., None]
    strict = jnp.tril(jnp.ones((C, C), bool), -1)
    a = jnp.where(strict, jnp.einsum("...ik,...jk->...ij", k_beta, k) * pair, 0.0)
    eye = jnp.eye(C, dtype=f32)
    # the UT transform: (I + a) X = B, unit lower triangular
    rhs = jnp.concatenate([v * beta[..., None], k_beta * jnp.exp(cum)[..., None]], axis=-1)
    x = jax.lax.linalg.triangular_solve(
        eye + a, rhs, left_side=True, lower=True, unit_diagonal=True
    )
    Hv = v.shape[-1]
    u, w = x[..., :Hv], x[..., Hv:]
    attn = jnp.einsum("...ik,...jk->...ij", q, k) * pair
    qd = q * jnp.exp(cum)[..., None]
    kd = k * jnp.exp(cum[..., -1:] - cum)[..., None]
    return u, w, attn, qd, kd, jnp.exp(cum[..., -1])


def _chunk_apply(S, u, w, attn, qd, kd, decay):
    """One chunk's output and the state after it, from the state before it.
    S (N, Hk, Hv); the rest one chunk of `_chunk_prep`'s outputs -> out (N, C, Hv), S."""
    v_new = u - jnp.einsum("NCK,NKV->NCV", w, S)
    out = jnp.einsum("NCK,NKV->NCV", qd, S) + jnp.einsum("NCD,NDV->NCV", attn, v_new)
    S = S * decay[:, None, None] + jnp.einsum("NCK,NCV->NKV", kd, v_new)
    return out, S


def gated_delta_chunked(q, k, v, g, beta, state, chunk: int = 64):
    """One sequence in chunks of `chunk` tokens; same arguments and results as the reference."""
    L = q.shape[0]
    pad = -L % chunk
    padded = [jnp.pad(a.astype(f32), [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in (q, k, v)]
    g, beta = (jnp.pad(a.astype(f32), [(0, pad), (0, 0)]) for a in (g, beta))
    nc = (L + pad) // chunk
    q, k, v = (a.reshape(nc, chunk, *a.shape[1:]) for a in padded)
    g, beta = g.reshape(nc, chunk, -1), beta.reshape(nc, chunk, -1)
    prep = _chunk_prep(q, k, v, g, beta)

    def one(S, xs):
        out, S = _chunk_apply(S, *xs)
        return S, out

    state, out = jax.lax.scan(one, state.astype(f32), prep)  # out (nc, N, C, Hv)
    out = jnp.swapaxes(out, 1, 2).reshape(nc * chunk, *out.shape[1:2], out.shape[-1])
    return out[:L], state


# -- 3. the decode update -------------------------------------------------------------------------
def gated_delta_step(q, k, v, g, beta, state):
    """One token per row: q, k (B, N, Hk), v (B, N, Hv), g, beta (B, N), state (B, N, Hk, Hv)
    -> out (B, N, Hv), state."""
    q, k, v, g, beta = (a.astype(f32) for a in (q, k, v, g, beta))
    S = state.astype(f32) * jnp.exp(g)[..., None, None]
    kv_mem = jnp.einsum("BNKV,BNK->BNV", S, k)
    delta = (v - kv_mem) * beta[..., None]
    S = S + k[..., :, None] * delta[..., None, :]
    return jnp.einsum("BNKV,BNK->BNV", S, q), S


# -- 4. the causal convolution ---------------------------------------------------------------------
def causal_conv1d(x, weight, conv_state, activation=jax.nn.silu):
    """One sequence: x (L, E) channels E, weight (E, W) with W taps, conv_state (W - 1, E)
    the inputs before x -> out (L, E) in x's dtype, the new conv state (W - 1, E)."""
    W = weight.shape[-1]
    full = jnp.concatenate([conv_state.astype(x.dtype), x], axis=0)  # (W - 1 + L, E)
    L = x.shape[0]
    out = sum(full[m : m + L].astype(f32) * weight[:, m].astype(f32) for m in range(W))
    if activation is not None:
        out = activation(out)
    return out.astype(x.dtype), full[L:]


# -- the engine's ragged entry points -------------------------------------------------------------
def _rows(cu_q_lens: jax.Array, T: int) -> jax.Array:
    """(T,) the sequence row of each token (rows past the last real one for padding)."""
    return jnp.searchsorted(cu_q_lens[1:], jnp.arange(T), side="right").astype(jnp.int32)


def ragged_conv1d(x, weight, conv_states, slots, cu_q_lens, has_state, activation=jax.nn.silu):
    """A step's ragged batch through the causal convolution.

    x (T, E); weight (E, W); conv_states (slots + 1, W - 1, E); slots (S,) each row's slot;
    cu_q_lens (S+1,); has_state (S,) whether the row continues its slot's state (else it
    starts from zeros). Returns out (T, E) and conv_states with each real row's new state.
    """
    T, E = x.shape
    W = weight.shape[-1]
    S = slots.shape[0]
    spare = conv_states.shape[0] - 1
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    row = jnp.minimum(_rows(cu_q_lens, T), S - 1)
    j = jnp.arange(T) - cu_q_lens[row]  # position inside the row's chunk
    own = (conv_states[slots] * has_state[:, None, None].astype(conv_states.dtype)).astype(x.dtype)
    tok_state = own[row]  # (T, W - 1, E): fine for W - 1 = 3 and one layer at a time
    out = jnp.zeros((T, E), f32)
    for m in range(W):  # tap m reads the input d = W - 1 - m tokens back
        d = W - 1 - m
        shifted = jnp.roll(x, d, axis=0)
        back = jnp.take_along_axis(
            tok_state, jnp.clip(W - 1 - d + j, 0, W - 2)[:, None, None], axis=1
        )[:, 0]
        inp = jnp.where((j >= d)[:, None], shifted, back)
        out = out + inp.astype(f32) * weight[:, m].astype(f32)
    if activation is not None:
        out = activation(out)
    # new state of row r: the last W - 1 inputs of (its old state ++ its chunk)
    m = jnp.arange(W - 1)
    idx = q_lens[:, None] + m[None, :]  # (S, W - 1) into the concatenation
    from_x = jnp.take(x, jnp.clip(cu_q_lens[:-1, None] + idx - (W - 1), 0, T - 1), axis=0)
    from_state = jnp.take_along_axis(own, jnp.clip(idx, 0, W - 2)[:, :, None], axis=1)
    new = jnp.where((idx >= W - 1)[:, :, None], from_x, from_state)
    dest = jnp.where(q_lens > 0, slots, spare)
    conv_states = conv_states.at[dest].set(new.astype(conv_states.dtype))
    return out.astype(x.dtype), conv_states


def ragged_gated_delta(
    q, k, v, g, beta, states, slots, cu_q_lens, has_state, chunk: int = 64, backend=None
):
    """A step's ragged batch through the gated delta rule.

    q, k (T, N, Hk), v (T, N, Hv), g, beta (T, N); states (slots + 1, N, Hk, Hv) float32;
    slots, has_state (S,); cu_q_lens (S+1,). Returns out (T, N, Hv) float32 and the states.
    `backend`: "xla" or "pallas" (module docstring); None reads JAXMM_GATED_DELTA_BACKEND.
    """
    backend = backend or os.environ.get(BACKEND_ENV, "xla")
    if backend not in BACKENDS:
        raise ValueError(f"gated delta backend {backend!r} not in {BACKENDS}")
    if backend == "pallas":
        from jaxmm.kernels.gated_delta_pallas import ragged_gated_delta_pallas

        return ragged_gated_delta_pallas(
            q, k, v, g, beta, states, slots, cu_q_lens, has_state, chunk=chunk
        )
    T, N, Hv = v.shape
    S = slots.shape[0]
    spare = states.shape[0] - 1
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    slots = jnp.where(q_lens > 0, slots, spare)
    keep = has_state.astype(f32)[:, None, None, None]

    # every row's starting state, read once; the pool itself is written once, after both
    # paths, so the conditional below carries S rows rather than the whole pool
    init = states[slots] * keep  # (S, N, Hk, Hv)

    # single-token rows (decodes, and one-token prefill chunks): one vectorised update
    single = q_lens == 1
    t0 = jnp.minimum(cu_q_lens[:-1], T - 1)
    out_rows, final = gated_delta_step(q[t0], k[t0], v[t0], g[t0], beta[t0], init)
    out = jnp.zeros((T, N, Hv), f32).at[jnp.where(single, t0, T)].set(out_rows, mode="drop")

    multi = q_lens > 1
    # chunks aligned to each multi-token row's start: at most T // chunk + (rows of >= 2)
    NC = max(1, T // chunk + min(S, T // 2))  # a one-token step traces one (empty) chunk

    def prefill(args):
        out, final = args
        n_chunks = jnp.where(multi, -(-q_lens // chunk), 0)
        chunk_off = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(n_chunks)])
        total = chunk_off[-1]
        c = jnp.arange(NC)
        crow = jnp.minimum(jnp.searchsorted(chunk_off[1:], c, side="right"), S - 1)
        cstart = cu_q_lens[crow] + chunk * (c - chunk_off[crow])  # (NC,) first token
        clen = jnp.where(c < total, jnp.minimum(chunk, cu_q_lens[crow + 1] - cstart), 0)
        pos = jnp.arange(chunk)
        tok = jnp.clip(cstart[:, None] + pos[None, :], 0, T - 1)  # (NC, C)
        valid = pos[None, :] < clen[:, None]

        def gather(a):
            m = valid.reshape(valid.shape + (1,) * (a.ndim - 1))
            return jnp.where(m, a[tok].astype(f32), 0.0)

        u, w, attn, qd, kd, decay = _chunk_prep(*(gather(a) for a in (q, k, v, g, beta)))
        is_first = c == chunk_off[crow]
        is_last = c == chunk_off[crow + 1] - 1

        def body(i, carry):
            S_, final, outc = carry
            r = crow[i]
            S_ = jnp.where(is_first[i], init[r], S_)
            o, S_ = _chunk_apply(S_, u[i], w[i], attn[i], qd[i], kd[i], decay[i])
            outc = jax.lax.dynamic_update_index_in_dim(outc, o, i, 0)
            kept = jnp.where(is_last[i], S_, final[r])
            final = jax.lax.dynamic_update_index_in_dim(final, kept, r, 0)
            return S_, final, outc

        S0 = jnp.zeros(states.shape[1:], f32)
        outc = jnp.zeros((NC, N, chunk, Hv), f32)
        _, final, outc = jax.lax.fori_loop(0, total, body, (S0, final, outc))
        flat = jnp.swapaxes(outc, 1, 2).reshape(NC * chunk, N, Hv)
        dest = jnp.where(valid, tok, T).reshape(-1)
        out = out.at[dest].set(flat, mode="drop")
        return out, final

    out, final = jax.lax.cond(jnp.any(multi), prefill, lambda a: a, (out, final))
    return out, states.at[slots].set(final)
