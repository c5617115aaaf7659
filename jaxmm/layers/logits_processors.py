"""Per-request logits processors applied on device by the sampler, and prompt logprobs.

Each processor is data, never a program variant per request: a batch mixes rows with and
without it in one program, and the arrays keep fixed shapes.

- `logit_bias`: a fixed-size `(S, B)` table of token ids (-1 padded) and additive biases
  (`B = MAX_LOGIT_BIAS`), added to the logits before sampling (OpenAI's `logit_bias`).
- `bitmask`: `(S, ceil(V / 32))` int32, bit `t % 32` of word `t // 32` set where token t is
  allowed (structured outputs: the grammar engine fills it on the host); rows without a
  constraint are all ones. Disallowed tokens get -inf.

`LogitsExtras` carries whichever of them a step needs (None: absent, and the program that
takes it is a separate variant compiled on first use, so steps without them cost nothing).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# OpenAI accepts at most this many logit_bias entries per request (the table's width)
MAX_LOGIT_BIAS = 300


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LogitsExtras:
    bias_ids: jax.Array | None = None  # (S, B) i32, -1 padded
    bias_values: jax.Array | None = None  # (S, B) f32
    bitmask: jax.Array | None = None  # (S, W) i32, W = ceil(V / 32)


def apply_logit_bias(logits: jax.Array, ids: jax.Array, values: jax.Array) -> jax.Array:
    """logits (S, V) + bias at (row, ids[row, j]); ids < 0 are padding (dropped)."""
    S, V = logits.shape
    ids = jnp.where(ids < 0, V, ids)  # V -> out of bounds -> dropped
    return logits.at[jnp.arange(S)[:, None], ids].add(values.astype(logits.dtype), mode="drop")


def unpack_bitmask(bitmask: jax.Array, vocab_size: int) -> jax.Array:
    """(S, W) int32 words -> (S, V) bool, token t allowed where bit t % 32 of word t // 32."""
    shifts = jnp.arange(32, dtype=jnp.int32)
    bits = (bitmask[:, :, None] >> shifts) & 1  # (S, W, 32)
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].astype(bool)


def apply_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    allowed = unpack_bitmask(bitmask, logits.shape[-1])
    return jnp.where(allowed, logits, -jnp.inf)


def apply_extras(logits: jax.Array, extras: LogitsExtras) -> jax.Array:
    """All of a step's processors, in vLLM's order: bias, then the grammar mask."""
    if extras.bias_ids is not None:
        logits = apply_logit_bias(logits, extras.bias_ids, extras.bias_values)
    if extras.bitmask is not None:
        logits = apply_bitmask(logits, extras.bitmask)
    return logits


def prompt_logprobs(
    compute_logits, hidden: jax.Array, targets: jax.Array, k: int, chunk: int = 256
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per token t of a step: the logprob and rank of `targets[t]` (the prompt's next token)
    under the model's distribution after t, and the top-k (ids, logprobs).

    hidden (T, D); targets (T,) i32 (< 0: not wanted, results there are junk). The (T, V)
    logits are made `chunk` rows at a time, so the peak is (chunk, V), not (T, V).
    """
    T = hidden.shape[0]
    c = min(chunk, T)
    if T % c:
        c = T  # buckets above 256 tokens are multiples of 256: this is the small-T case

    def one(args):
        h, tgt = args
        lp = jax.nn.log_softmax(compute_logits(h).astype(jnp.float32), axis=-1)  # (c, V)
        tlp = jnp.take_along_axis(lp, jnp.maximum(tgt, 0)[:, None], axis=-1)[:, 0]
        rank = 1 + jnp.sum(lp > tlp[:, None], axis=-1).astype(jnp.int32)
        top_lp, top_ids = jax.lax.top_k(lp, k)
        return tlp, rank, top_ids.astype(jnp.int32), top_lp

    out = jax.lax.map(one, (hidden.reshape(T // c, c, -1), targets.reshape(T // c, c)))
    return tuple(x.reshape(T, *x.shape[2:]) for x in out)
