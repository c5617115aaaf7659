"""The pooling runner: an encoder-only model on device, one jitted program per (B, C) bucket.

1. Load: like the ModelRunner, the HF config picks the model class (BertModel, ...), which is
   built abstractly and filled from the checkpoint onto the mesh (1x1 by default).
2. Plan: prompts are sorted by length and cut into batches; each batch is right-padded to a
   bucket: C (tokens) a power of two from 16, capped at max_model_len, and B (sequences) a
   power of two, with B * C <= the token budget and B <= max_num_seqs. Sorting keeps prompts
   of similar length together, so little of a bucket is padding.
3. Run: `forward(params, ids (B, C), lens (B,)) -> (B, D)` encodes and pools on device
   (pooling type fixed per model) and returns float32 vectors; normalisation, a
   per-request choice, is left to the caller.
4. `warmup()` compiles every bucket; `num_compiled()` lets a test check that nothing new
   compiles afterwards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmm.models.registry import model_class
from jaxmm.runner.checkpoint import Checkpoint
from jaxmm.runner.model_runner import MIN_BUCKET, make_mesh, next_pow2
from jaxmm.weights.loader import cast_dtype, load_params, random_params

# B * C per batch when max_num_batched_tokens is not given: attention scores are
# B * N * C * C floats, 100 MB for MiniLM (N=12) at C=256
_CPU_TOKEN_BUDGET = 8192
_ACCEL_TOKEN_BUDGET = 32768


def pool(hidden: jax.Array, lens: jax.Array, pooling_type: str) -> jax.Array:
    """hidden (B, C, D), lens (B,) real tokens per row -> (B, D) float32."""
    h = hidden.astype(jnp.float32)
    C = h.shape[1]
    mask = (jnp.arange(C)[None, :] < lens[:, None])[..., None]  # (B, C, 1)
    if pooling_type == "CLS":
        return h[:, 0]
    if pooling_type == "LAST":
        return jnp.take_along_axis(h, jnp.maximum(lens - 1, 0)[:, None, None], axis=1)[:, 0]
    if pooling_type == "MEAN":  # sentence-transformers: sum / clamp(count, 1e-9)
        count = jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
        return jnp.sum(jnp.where(mask, h, 0.0), axis=1) / count
    if pooling_type == "MAX":
        return jnp.max(jnp.where(mask, h, jnp.finfo(jnp.float32).min), axis=1)
    raise ValueError(f"unknown pooling type {pooling_type!r}")


class PoolingRunner:
    def __init__(
        self,
        ck: Checkpoint,
        pooling_type: str,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        tensor_parallel_size: int = 1,
        load_format: str = "auto",
    ):
        self.hf_config = ck.hf_config
        self.pooling_type = pooling_type
        self.dtype = cast_dtype(dtype, ck.hf_config)
        self.mesh = make_mesh(tensor_parallel_size)

        cls = model_class(ck.hf_config)
        abstract = nnx.eval_shape(lambda: cls(ck.hf_config, dtype=self.dtype, rngs=nnx.Rngs(0)))
        self.graphdef, abstract_state = nnx.split(abstract)
        if load_format == "dummy":
            self.params = random_params(abstract_state, self.mesh)
        else:
            self.params = load_params(abstract, abstract_state, ck.tensors(), self.mesh, self.dtype)
        self.hidden_size = abstract.hidden_size
        self.vocab_size = ck.hf_config.vocab_size

        limit = abstract.max_positions
        if max_model_len is not None and max_model_len > limit:
            raise ValueError(
                f"max_model_len={max_model_len} is longer than the model's {limit} positions"
            )
        self.max_model_len = max_model_len or limit
        on_cpu = jax.default_backend() == "cpu"
        budget = max_num_batched_tokens or (_CPU_TOKEN_BUDGET if on_cpu else _ACCEL_TOKEN_BUDGET)
        self.token_budget = max(budget, self.max_model_len)  # one longest prompt always fits
        self.max_num_seqs = max_num_seqs
        self.len_buckets = []
        c = MIN_BUCKET
        while c < self.max_model_len:
            self.len_buckets.append(c)
            c *= 2
        self.len_buckets.append(self.max_model_len)
        self._forward = jax.jit(self._forward_fn)

    # -- the compiled program -----------------------------------------------------------------
    def _forward_fn(self, params, ids, lens):
        model = nnx.merge(self.graphdef, params)
        mask = jnp.arange(ids.shape[1])[None, :] < lens[:, None]
        return pool(model(ids, mask), lens, self.pooling_type)

    # -- batching -----------------------------------------------------------------------------
    def len_bucket(self, n: int) -> int:
        for c in self.len_buckets:
            if c >= n:
                return c
        raise ValueError(f"{n} tokens exceed max_model_len={self.max_model_len}")

    def plan(self, lengths: list[int]) -> list[list[int]]:
        """Indices of the prompts grouped into batches, shortest prompts first."""
        batches: list[list[int]] = []
        current: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
            C = self.len_bucket(lengths[i])  # the longest so far: lengths ascend
            grown = len(current) + 1
            if current and (grown > self.max_num_seqs or next_pow2(grown) * C > self.token_budget):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def run_batch(self, seqs: list[list[int]]) -> np.ndarray:
        """One padded batch -> (len(seqs), D) float32 pooled vectors."""
        C = self.len_bucket(max(len(s) for s in seqs))
        B = next_pow2(len(seqs))
        ids = np.zeros((B, C), np.int32)
        lens = np.zeros(B, np.int32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            lens[i] = len(s)
        out = self._forward(self.params, ids, lens)
        return np.asarray(out)[: len(seqs)]

    def embed(self, seqs: list[list[int]], progress=None) -> np.ndarray:
        """Token-id lists (each 1..max_model_len long) -> (n, D) float32, in input order.

        `progress(k)` is called after each batch with the number of prompts it held."""
        out = np.zeros((len(seqs), self.hidden_size), np.float32)
        for batch in self.plan([len(s) for s in seqs]):
            out[batch] = self.run_batch([seqs[i] for i in batch])
            if progress is not None:
                progress(len(batch))
        return out

    # -- warmup and the compile guard ---------------------------------------------------------
    def buckets(self) -> list[tuple[int, int]]:
        """Every (B, C) shape `plan` can produce."""
        shapes = []
        for C in self.len_buckets:
            B = 1
            while B <= next_pow2(self.max_num_seqs) and B * C <= self.token_budget:
                shapes.append((B, C))
                B *= 2
        return shapes

    def warmup(self) -> None:
        for B, C in self.buckets():
            ids = np.zeros((B, C), np.int32)
            jax.block_until_ready(self._forward(self.params, ids, np.ones(B, np.int32)))

    def num_compiled(self) -> int:
        return self._forward._cache_size()
