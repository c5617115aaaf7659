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


def _filter(logits, t: SamplingTensors):
    """Top-k, top-p, min-p on temperature-scaled logits; masked entries -> -inf."""
    S, V = logits.shape
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
    k = jnp.where(t.top_k > 0, jnp.minimum(t.top_k, V), V)
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    # top-p over the top-k-filtered distribution
    sorted_masked = jnp.where(jnp.arange(V)[None, :] < k[:, None], sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_masked, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    keep = (cum - probs) < t.top_p[:, None]  # always keeps the first
    cutoff_idx = jnp.maximum(jnp.sum(keep, axis=-1) - 1, 0)
    cutoff = jnp.take_along_axis(sorted_masked, cutoff_idx[:, None], axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    # min-p relative to the most likely token
    p = jax.nn.softmax(logits, axis=-1)
    pmax = jnp.max(p, axis=-1, keepdims=True)
    logits = jnp.where(p < t.min_p[:, None] * pmax, -jnp.inf, logits)
    return logits


def sample(
    logits: jax.Array,
    t: SamplingTensors,
    *,
    all_greedy: bool,
    use_filters: bool,
    use_penalties: bool,
    num_logprobs: int,
):
    """logits (S, V) f32 -> tokens (S,), (token logprob (S,), its rank (S,)), top ids, top lps.

    `use_penalties` also turns on the banned-token mask (min_tokens).
    """
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1) if num_logprobs >= 0 else None
    if use_penalties:
        logits = apply_penalties(logits, t)
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
