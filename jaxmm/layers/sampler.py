"""Sampling on device: penalties, greedy/temperature, top-k/top-p/min-p, per-row seeds, logprobs.

One row per sequence (S). Each row's randomness comes from its own key,
`fold_in(key(seed), output_position)`, so a seeded request samples the same tokens whatever
else shares its batch. Logprobs are those of the model's raw distribution (as vLLM reports).
Variants (all greedy, filters, penalties, logprobs) are static flags: one program each.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmm.layers.logits_processors import LogitsExtras, apply_extras

MAX_LOGPROBS = 20


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingTensors:
    temperature: jax.Array  # (S,) f32, 0 = greedy
    top_k: jax.Array  # (S,) i32, 0 = off
    top_p: jax.Array  # (S,) f32
    min_p: jax.Array  # (S,) f32
    seeds: jax.Array  # (S,) u32
    steps: jax.Array  # (S,) i32 output position of the token being sampled
    presence: jax.Array  # (S,) f32
    frequency: jax.Array  # (S,) f32
    repetition: jax.Array  # (S,) f32
    seen_tokens: jax.Array  # (S, L) i32, -1 padded: prompt + output tokens (penalties only)
    seen_is_output: jax.Array  # (S, L) bool
    banned: jax.Array  # (S, B) i32, -1 padded: tokens that may not be sampled (min_tokens)


def apply_penalties(logits, t: SamplingTensors):
    S, V = logits.shape
    rows = jnp.arange(S)[:, None]
    tok = jnp.where(t.seen_tokens < 0, V, t.seen_tokens)  # V -> dropped
    out_counts = (
        jnp.zeros((S, V), jnp.float32)
        .at[rows, tok]
        .add(t.seen_is_output.astype(jnp.float32), mode="drop")
    )
    seen = jnp.zeros((S, V), bool).at[rows, tok].set(True, mode="drop")
    rep = t.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - t.frequency[:, None] * out_counts
    logits = logits - t.presence[:, None] * (out_counts > 0)
    banned = jnp.where(t.banned < 0, V, t.banned)
    return logits.at[jnp.arange(S)[:, None], banned].set(-jnp.inf, mode="drop")


# Top-k and top-p without sorting the vocabulary: XLA's CPU sort of one 49,152-entry row
# takes ~67 ms, half of a SmolLM2-135M decode step. Both cuts are thresholds on the logits:
# - usually they fall among the row's `_CANDIDATES` largest logits (`lax.top_k`, sorted):
#   top_k <= _CANDIDATES and, for top-p, the candidates carry at least top_p of the mass;
# - otherwise (a batch with a larger top_k, or a flat distribution), each threshold is found
#   by bisection over the float32 values' order-preserving uint32 keys: 32 masked reductions
#   over the row, ending on an exact logit value.
# Both give the same thresholds, so a row's tokens do not depend on which one its batch took.
_CANDIDATES = 256
_SEARCH_STEPS = 32


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys in the same order (-inf lowest): flip a negative's bits, set a
    non-negative's sign bit."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _bisect(pred, S: int) -> jax.Array:
    """(S,) smallest uint32 key u with pred(u[:, None]) true, for a predicate monotone in u
    (false, then true) that holds at the largest key."""

    def step(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        ok = pred(mid[:, None])
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo = jnp.zeros(S, jnp.uint32)
    hi = jnp.full(S, 0xFFFFFFFF, jnp.uint32)
    return jax.lax.fori_loop(0, _SEARCH_STEPS, step, (lo, hi))[1]


def _filter(logits, t: SamplingTensors):
    """Top-k, then top-p over the top-k survivors, then min-p, on temperature-scaled logits;
    masked entries -> -inf. A value tied with the last kept one is kept (as with a cut made
    on the sorted row).

    top-k keeps the values >= the k-th largest. top-p keeps a value when the mass of the
    values strictly above it is under top_p (so the token that crosses top_p is kept), the
    mass taken over the top-k survivors. min-p keeps p >= min_p * p_max.
    """
    S, V = logits.shape
    K = min(V, _CANDIDATES)
    keys = _order_keys(logits)  # (S, V)
    vals, _ = jax.lax.top_k(logits, K)  # (S, K), descending
    k = jnp.where(t.top_k > 0, jnp.minimum(t.top_k, V), V)
    k_on = k < V

    # -- top-k: the k-th largest key (0: keep all)
    def kth_candidates():
        kth = jnp.take_along_axis(vals, (jnp.minimum(k, K) - 1)[:, None], axis=-1)[:, 0]
        return jnp.where(k_on, _order_keys(kth), 0)

    def kth_bisect():  # count(keys > u) < k first holds at the k-th largest key
        return _bisect(lambda u: jnp.sum(keys > u, axis=-1) < k, S)

    kth = jax.lax.cond(jnp.all(~k_on | (k <= K)), kth_candidates, kth_bisect)
    logits = jnp.where(keys < kth[:, None], -jnp.inf, logits)

    # -- top-p over what top-k kept: the smallest key whose mass above is under top_p
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    p_on = t.top_p < 1
    cand = jnp.where(_order_keys(vals) < kth[:, None], -jnp.inf, vals)
    cand_p = jnp.exp(cand - lse)
    cum = jnp.cumsum(cand_p, axis=-1)

    def cut_candidates():
        kept = (cum - cand_p) < t.top_p[:, None]  # the first one is always kept
        cut = jnp.min(jnp.where(kept, cand, jnp.inf), axis=-1)
        return jnp.where(p_on, _order_keys(cut), 0)

    def cut_bisect():
        probs = jnp.exp(logits - lse)
        cut = _bisect(lambda u: jnp.sum(jnp.where(keys > u, probs, 0.0), axis=-1) < t.top_p, S)
        return jnp.where(p_on, cut, 0)

    covered = ~p_on | (cum[:, -1] >= t.top_p)
    cut = jax.lax.cond(jnp.all(covered), cut_candidates, cut_bisect)
    logits = jnp.where(keys < cut[:, None], -jnp.inf, logits)

    # -- min-p relative to the most likely token, as logits: l >= l_max + log(min_p)
    floor = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(jnp.maximum(t.min_p, 1e-30))[:, None]
    return jnp.where((t.min_p[:, None] > 0) & (logits < floor), -jnp.inf, logits)


def sample(
    logits: jax.Array,
    t: SamplingTensors,
    *,
    all_greedy: bool,
    use_filters: bool,
    use_penalties: bool,
    num_logprobs: int,
    extras: LogitsExtras | None = None,
):
    """logits (S, V) f32 -> tokens (S,), (token logprob (S,), its rank (S,)), top ids, top lps.

    `use_penalties` also turns on the banned-token mask (min_tokens); `extras`: logit bias
    and grammar masks (`logits_processors.py`).
    """
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1) if num_logprobs >= 0 else None
    if use_penalties:
        logits = apply_penalties(logits, t)
    if extras is not None:
        logits = apply_extras(logits, extras)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if all_greedy:
        tokens = greedy
    else:
        temp = jnp.where(t.temperature > 0, t.temperature, 1.0)
        scaled = logits / temp[:, None]
        if use_filters:
            scaled = _filter(scaled, t)

        def one(seed, step, row):
            key = jax.random.fold_in(jax.random.key(seed), step)
            return jax.random.categorical(key, row)

        sampled = jax.vmap(one)(t.seeds, t.steps, scaled).astype(jnp.int32)
        tokens = jnp.where(t.temperature > 0, sampled, greedy)
    if num_logprobs < 0:
        return tokens, None, None, None
    token_lp = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    rank = 1 + jnp.sum(raw_logprobs > token_lp[:, None], axis=-1).astype(jnp.int32)
    token_lp = (token_lp, rank)
    if num_logprobs == 0:
        return tokens, token_lp, None, None
    top_lp, top_ids = jax.lax.top_k(raw_logprobs, num_logprobs)
    return tokens, token_lp, top_ids.astype(jnp.int32), top_lp
