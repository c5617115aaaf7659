"""Paged attention as every model calls it, and the step metadata that drives it.

Models call `paged_attention(q, k, v, kv_pages, md, ...)`; which implementation runs
(pure-JAX reference, our Pallas kernel, ...) is fixed when the model is built, by the one
attention-backend switch (`jaxmm.kernels.ATTENTION_BACKENDS`, `jaxmm.kernels.backends`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxmm.kernels import backends

MODEL_AXIS = "model"  # the mesh axis tensor parallelism shards heads and vocabulary over


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    """Fixed-shape description of one step's ragged batch (padded to its bucket)."""

    positions: jax.Array  # (T,) int32 position of each token (or (3, T) for M-RoPE)
    kv_lens: jax.Array  # (S,) int32 cached tokens after this step
    page_indices: jax.Array  # (S, P) int32
    cu_q_lens: jax.Array  # (S+1,) int32
    num_seqs: jax.Array  # (1,) int32
    logits_indices: jax.Array  # (S,) int32 token whose logits each sequence samples from


def resolve_backend(name: str) -> str:
    """A name from `jaxmm.kernels.ATTENTION_BACKENDS` -> the concrete backend here ("auto"
    resolved; see `jaxmm.kernels.backends.resolve`)."""
    return backends.resolve(name)


def paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_pages: jax.Array,
    md: AttentionMetadata,
    *,
    sm_scale: float,
    backend: str = "reference",
    sliding_window: int | None = None,
    soft_cap: float | None = None,
):
    """q (T, N, H), k/v (T, K, H), kv_pages (2, K', A, G, H) -> out (T, N, H), kv_pages.

    K' > K when the tensor-parallel size exceeds the KV heads: each KV head is stored
    K' / K times, once per model-axis device whose q heads read it (`replicated_kv_heads`).
    Under a mesh with a "model" axis (the runner sets it while tracing the step) the kernel
    runs inside `jax.shard_map` over KV heads: a pallas_call is not auto-partitioned, and
    each device attends its own q heads with its own KV heads, no communication.
    """
    r = kv_pages.shape[1] // k.shape[1]
    if r > 1:  # KV heads replicated: KV head j' holds original head j' // r
        k, v = jnp.repeat(k, r, axis=1), jnp.repeat(v, r, axis=1)
    fn = functools.partial(
        backends.attention_fn(backend),
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    meta = (md.kv_lens, md.page_indices, md.cu_q_lens, md.num_seqs)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or MODEL_AXIS not in mesh.axis_names:
        return fn(q, k, v, kv_pages, *meta)
    heads = P(None, MODEL_AXIS, None)
    pages = P(None, MODEL_AXIS, None, None, None)
    sharded = jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(heads, heads, heads, pages, *(P(),) * len(meta)),
        out_specs=(heads, pages),
        check_vma=False,  # Pallas kernels carry no varying-axes annotations
    )
    return sharded(q, k, v, kv_pages, *meta)


def replicated_kv_heads(num_heads: int, num_kv_heads: int, tp: int) -> int:
    """KV heads the paged cache holds at tensor-parallel size `tp` (K' above).

    As vLLM does: with tp <= K each device holds K / tp heads; with tp > K every device holds
    one, each original head stored tp / K times. Sizes where neither divides, or the q heads
    do not split evenly, raise ValueError naming the sizes that work.
    """
    if tp <= 0 or num_heads % tp or (num_kv_heads % tp and tp % num_kv_heads):
        valid = valid_tp_sizes(num_heads, num_kv_heads)
        raise ValueError(
            f"tensor_parallel_size={tp} cannot split {num_heads} attention heads and "
            f"{num_kv_heads} KV heads evenly; valid sizes: {', '.join(map(str, valid))}"
        )
    return max(num_kv_heads, tp)


def valid_tp_sizes(num_heads: int, num_kv_heads: int) -> list[int]:
    """Tensor-parallel sizes that split N q heads and K KV heads (replicating KV heads)."""
    return [
        t
        for t in range(1, num_heads + 1)
        if num_heads % t == 0 and (num_kv_heads % t == 0 or t % num_kv_heads == 0)
    ]


def dense_attention(q, k, v, *, causal: bool, sm_scale: float, segment_ids=None, bias=None):
    """Encoder attention (ViT, Whisper): q (B, C, N, H), k/v (B, C, K, H)."""
    del segment_ids
    scores = jnp.einsum("BqNH,BkNH->BNqk", q.astype(jnp.float32), k.astype(jnp.float32))
    scores = scores * sm_scale
    if bias is not None:
        scores = scores + bias
    if causal:
        qn, kn = scores.shape[-2:]
        mask = jnp.tril(jnp.ones((qn, kn), bool), kn - qn)
        scores = jnp.where(mask, scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("BNqk,BkNH->BqNH", p, v.astype(jnp.float32)).astype(q.dtype)
