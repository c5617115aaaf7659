"""The model runner: parameters and KV pages on device, one jitted step per token bucket.

1. Load: the checkpoint's HF config picks the model class; the model is built abstractly
   (`nnx.eval_shape`) and its parameters are filled from the checkpoint, each placed on the
   mesh (1x1 by default, axes ("data", "model")) with its partition spec.
2. KV cache: one `(2, K, A, G, H)` array per layer, A pages sized from the memory budget,
   sharded over KV heads.
3. Step: the engine's batch becomes flat arrays padded to a token bucket T (powers of two
   from 16, with 1.5x steps from 1,024 on: `token_buckets`) with S = min(T, max_num_seqs)
   sequence rows, so each bucket is exactly one compiled program:
   `step(params, kv_caches, ids, md) -> (kv_caches, logits)` with the caches donated.
   Sampling is a second small program.
4. Encoder stage (multimodal models): one device array of encoder outputs, the encoder
   cache `(R + 1, D)`, whose rows the engine's `EncoderCacheManager` hands out per item.
   `encode` runs the model's encoders on host inputs (pixel/patch bytes, audio features)
   and writes each item's rows into the cache (user embeddings are copied there too); the
   step takes the cache and a row index per token (-1: the token's own embedding), so
   splicing is part of the step's one program per bucket.
5. Warmup compiles every bucket up front; `num_compiled()` lets a test check that serving
   compiles nothing new afterwards. With a persistent cache directory, warmup's programs are
   saved whole and a later start loads them without tracing (`saved_programs.py`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxmm import progress
from jaxmm.config import EngineConfig
from jaxmm.layers.attention import AttentionMetadata, replicated_kv_heads, resolve_backend
from jaxmm.layers.logits_processors import MAX_LOGIT_BIAS, LogitsExtras, prompt_logprobs
from jaxmm.layers.sampler import MAX_LOGPROBS, sample
from jaxmm.models.registry import model_class
from jaxmm.runner.batch import (
    InFlight,
    ResolvedLimits,
    SeqStep,
    StepArrays,
    StepOutput,
    next_pow2,
    sampling_tensors,
)
from jaxmm.runner.checkpoint import Checkpoint
from jaxmm.runner.saved_programs import SavedPrograms
from jaxmm.runner.setup import (
    FIRST_DEVICE_ENV,
    MIN_BUCKET,
    SHARD_MAP_ENV,
    backend_compile_count,
    enable_compilation_cache,
    make_mesh,
    token_buckets,
)
from jaxmm.weights.loader import cast_dtype, load_params, random_params

logger = logging.getLogger(__name__)

# the step's types and the set-up helpers are imported from here by the engine, tests and
# benchmarks as well
__all__ = [
    "FIRST_DEVICE_ENV",
    "MIN_BUCKET",
    "SHARD_MAP_ENV",
    "InFlight",
    "ModelRunner",
    "ResolvedLimits",
    "SeqStep",
    "StepArrays",
    "StepOutput",
    "backend_compile_count",
    "enable_compilation_cache",
    "make_mesh",
    "next_pow2",
    "token_buckets",
]

# encoder cache rows at least (4x max_num_batched_tokens otherwise): 2-B-scale models keep
# ~100 MB there, a dozen 1344^2 images' features
_MIN_ENCODER_CACHE_ROWS = 16384
# encoder-decoder models: cross-attention encoder calls batch at most this many requests
# (padded to a power of two by the model)
MAX_CROSS_BATCH = 8
_CPU_DEFAULT_KV_BYTES = 1 << 30


class ModelRunner:
    """Params and caches on device, one jitted step per token bucket, the encoder stage.

    Built from the engine's configs (`EngineConfig`: model, cache, scheduler, parallel);
    `limits` hands back what it resolved them to.
    """

    def __init__(self, ck: Checkpoint, config: EngineConfig, *, encoder_cache_rows=None):
        mc, sc, cc = config.model, config.scheduler, config.cache
        dtype, max_model_len = mc.dtype, mc.max_model_len
        max_num_seqs, max_num_batched_tokens = sc.max_num_seqs, sc.max_num_batched_tokens
        block_size, gpu_memory_utilization = cc.block_size, cc.gpu_memory_utilization
        kv_cache_memory_bytes = cc.kv_cache_memory_bytes
        num_gpu_blocks_override = cc.num_gpu_blocks_override
        attention_backend, load_format = mc.attention_backend, mc.load_format
        tensor_parallel_size = config.tensor_parallel_size
        t_start = time.perf_counter()
        # seconds spent in each phase of start-up (and warmup), for benchmarks and logs
        self.init_times: dict[str, float] = {}
        self.hf_config = ck.hf_config
        self.dtype = cast_dtype(dtype, ck.hf_config)
        self.block_size = block_size
        jax.devices()
        self.init_times["backend_init"] = round(time.perf_counter() - t_start, 3)
        self.backend = resolve_backend(attention_backend)
        self.init_times["attention_probe"] = round(
            time.perf_counter() - t_start - self.init_times["backend_init"], 3
        )
        self.on_cpu = jax.default_backend() == "cpu"

        self.mesh = make_mesh(tensor_parallel_size)

        cls = model_class(ck.hf_config)
        text_config = getattr(ck.hf_config, "text_config", None) or ck.hf_config

        def build():
            return cls(
                ck.hf_config, dtype=self.dtype, attention_backend=self.backend, rngs=nnx.Rngs(0)
            )

        t0 = time.perf_counter()
        abstract = nnx.eval_shape(build)
        self.init_times["build"] = round(time.perf_counter() - t0, 3)
        self.num_layers, self.num_kv_heads, self.head_dim = abstract.kv_cache_spec()
        # models with sliding-window layers page them in groups, each with its own table per
        # sequence over one pool (block_manager.py): a page of any group lies in the
        # kv_cache_spec layers' arrays, so a sequence's windowed groups give pages back
        groups = getattr(abstract, "kv_cache_groups", None)
        self.kv_group_windows = tuple(w for w, _ in groups()) if groups is not None else (None,)
        # (K, H) of each paged layer: models whose layers differ in KV heads or head size
        # (Gemma 4's global layers) list them, each layer gets a page pool of its own shape
        layer_shapes = getattr(abstract, "kv_cache_layer_shapes", None)
        self.kv_layer_shapes = (
            [(int(k), int(h)) for k, h in layer_shapes()]
            if layer_shapes is not None
            else [(self.num_kv_heads, self.head_dim)] * self.num_layers
        )
        # tensor parallelism, checked before any weight is read: q heads split over the model
        # axis, KV heads too, each stored once per device that reads it when there are fewer
        # of them than devices
        tp = tensor_parallel_size
        # the paged cache's q heads: an encoder-decoder's are its decoder's
        num_heads = getattr(text_config, "decoder_attention_heads", None) or getattr(
            text_config, "num_attention_heads", self.num_kv_heads
        )
        if tp > 1:
            self.num_kv_heads = replicated_kv_heads(num_heads, self.num_kv_heads, tp)
            self.kv_layer_shapes = [
                (replicated_kv_heads(num_heads, k, tp), h) for k, h in self.kv_layer_shapes
            ]
        self.shard_attention = tp > 1 or os.environ.get(SHARD_MAP_ENV, "1") != "0"
        t0 = time.perf_counter()
        self.graphdef, abstract_state = nnx.split(abstract)
        self.model_obj = abstract
        if load_format == "dummy":  # random weights, for benchmarks
            self.params = random_params(abstract_state, self.mesh)
        else:
            self.params = load_params(abstract, abstract_state, ck.tensors(), self.mesh, self.dtype)
        jax.block_until_ready(self.params)
        self.init_times["params"] = round(time.perf_counter() - t0, 3)
        progress.note("loaded weights in %.1f s", self.init_times["params"])
        self.vocab_size = text_config.vocab_size
        self.hidden_size = text_config.hidden_size
        # encoder cache row width: the embedding, and for Qwen3-VL its DeepStack features too
        self.mm_row_width = int(getattr(abstract, "mm_row_width", 0) or self.hidden_size)
        self.is_multimodal = bool(getattr(abstract, "is_multimodal", False))
        self.uses_mrope = bool(getattr(abstract, "uses_mrope", False))
        # models whose encoder outputs replace placeholder tokens' embeddings (not an
        # encoder-decoder, whose encoder output is its cross-attention K/V)
        self.splices_embeds = self.is_multimodal and not getattr(
            abstract, "is_encoder_decoder", False
        )

        # -- lengths and budgets
        max_pos = getattr(text_config, "max_position_embeddings", None) or 2048
        self.max_model_len = max_model_len or (min(max_pos, 8192) if self.on_cpu else max_pos)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 1024 if self.on_cpu else 4096
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = min(max_num_seqs, max_num_batched_tokens)
        self.pages_per_seq = -(-self.max_model_len // block_size)

        bytes_per_page = (  # on one device: the budget is one device's memory
            2
            * sum((k // tp) * h for k, h in self.kv_layer_shapes)
            * block_size
            * jnp.dtype(self.dtype).itemsize
        )
        # hybrid models: per-sequence state slots (conv and recurrent state of each linear
        # layer), one per running sequence plus a scratch slot that padding rows write to;
        # allocated before the KV budget is measured, so the budget leaves them room
        state_spec = getattr(abstract, "state_cache_spec", None)
        state_spec = state_spec(self.dtype) if state_spec is not None else []
        self.num_state_slots = self.max_num_seqs if state_spec else 0
        # prefix caching: snapshots of the state at cached prefixes (engine/state_cache.py)
        self.num_snapshot_slots = max(1, self.max_num_seqs // 4) if state_spec else 0
        self.state_scratch_slot = self.num_state_slots + self.num_snapshot_slots
        self.state_bytes_per_slot = sum(math.prod(s) * jnp.dtype(d).itemsize for s, d in state_spec)
        state_caches = [
            jax.device_put(
                jnp.zeros((self.state_scratch_slot + 1, *s), d),
                NamedSharding(self.mesh, PartitionSpec()),
            )
            for s, d in state_spec
        ]
        self.encoder_cache_rows = 0
        self.encoder_cache = None
        if self.splices_embeds:
            # allocated before the KV budget is measured, so the budget leaves it room
            self.encoder_cache_rows = encoder_cache_rows or max(
                4 * max_num_batched_tokens, _MIN_ENCODER_CACHE_ROWS
            )
            self.encoder_cache = jax.device_put(
                jnp.zeros((self.encoder_cache_rows + 1, self.mm_row_width), self.dtype),
                NamedSharding(self.mesh, PartitionSpec()),
            )
        if num_gpu_blocks_override:
            num_pages = num_gpu_blocks_override
        else:
            budget = self._kv_budget(gpu_memory_utilization, kv_cache_memory_bytes)
            if kv_cache_memory_bytes is not None:  # a given budget covers the state slots too
                budget -= (self.state_scratch_slot + 1) * self.state_bytes_per_slot
            want = self.max_num_seqs * self.seq_pages_max(max_num_batched_tokens) + 1
            num_pages = min(budget // bytes_per_page, want)
        if num_pages < self.seq_pages_max(max_num_batched_tokens):
            need = self.seq_pages_max(max_num_batched_tokens)
            raise ValueError(
                f"the KV cache holds {num_pages} pages of {block_size} tokens, fewer than one "
                f"sequence of max_model_len={self.max_model_len} needs ({need}); "
                "raise the memory budget (gpu_memory_utilization / kv_cache_memory_bytes) or "
                "lower max_model_len"
            )
        self.num_pages = int(num_pages)
        kv_sharding = NamedSharding(self.mesh, PartitionSpec(None, "model", None, None, None))
        self.kv_sharding = kv_sharding
        self.kv_caches = [
            jax.device_put(
                jnp.zeros((2, k, self.num_pages, block_size, h), self.dtype), kv_sharding
            )
            for k, h in self.kv_layer_shapes
        ]
        # models with extra per-request device state (e.g. encoder-decoder cross-attention
        # K/V slabs) append their own arrays; they travel, donated, with the KV pages
        extra = getattr(abstract, "extra_caches", None)
        self.cross_slots = 0  # encoder-decoder models: cross-attention K/V slots
        if extra is not None:
            self.kv_caches += [
                jax.device_put(a, NamedSharding(self.mesh, PartitionSpec()))
                for a in extra(self.dtype, self.max_num_seqs)
            ]
        self.kv_caches += state_caches  # after the KV pages, in the model's order
        self._state_start = len(self.kv_caches) - len(state_caches)
        if getattr(abstract, "is_encoder_decoder", False):
            self.cross_slots = int(self.kv_caches[self.num_layers].shape[1])
            if self.max_num_seqs > self.cross_slots:
                # the model caps the slabs' memory: one running request per slot
                logger.warning(
                    "max_num_seqs lowered from %d to %d: that many cross-attention slots fit",
                    self.max_num_seqs,
                    self.cross_slots,
                )
                self.max_num_seqs = self.cross_slots
        jax.block_until_ready(self.kv_caches)
        self.init_times["kv_cache"] = round(time.perf_counter() - t0 - self.init_times["params"], 3)
        progress.note(
            "allocated the KV cache (%d pages of %d tokens) in %.1f s",
            self.num_pages,
            block_size,
            self.init_times["kv_cache"],
        )
        self.token_buckets = token_buckets(max_num_batched_tokens)
        # rows of the largest bucket: sampled tokens are padded to it on device, so the next
        # step can read them (asynchronous scheduling) with one signature for every bucket
        self.max_rows = max(self.bucket(T)[1] for T in self.token_buckets)
        self._no_prev = jax.device_put(
            np.zeros(self.max_rows, np.int32), NamedSharding(self.mesh, PartitionSpec())
        )
        # the step takes the parameters as a flat list: flattening an nnx.State on every
        # call costs ~0.2 ms of host time per step, a flat list ~0.01 ms
        self._param_leaves, self._param_treedef = jax.tree_util.tree_flatten(self.params)
        self._step = jax.jit(self._step_fn, donate_argnums=(1,))
        self._sample = jax.jit(
            self._sample_fn,
            static_argnames=("all_greedy", "use_filters", "use_penalties", "num_logprobs"),
        )
        # encoder outputs into the encoder cache, in place (one program per source shape and
        # row-count bucket)
        self._write_rows = jax.jit(self._write_rows_fn, donate_argnums=(0,))
        # hybrid models: one slot's state into another (prefix-cache snapshots), in place
        self._copy_state = jax.jit(self._copy_state_fn, donate_argnums=(0,))
        self._mm_encode = None  # the model's encoder entry point, built on first use
        self._cross_write = None  # encoder-decoder models: encoder -> cross K/V slots
        # what the model and the step close over, besides the arguments' shapes
        salt = (
            _config_fingerprint(ck.hf_config),
            jnp.dtype(self.dtype).name,
            self.backend,
            self.max_rows,
            self.shard_attention,
        )
        self.step_programs = SavedPrograms("step", self._step, salt)
        self.sample_programs = SavedPrograms("sample", self._sample, salt)

    # -- setup ------------------------------------------------------------------------------
    def seq_pages_max(self, step_tokens: int) -> int:
        """The most pages one sequence holds across its page groups: every page of its
        context in full-attention groups, in a windowed group a window plus one step (and one
        page of misalignment at each end)."""
        P, G = self.pages_per_seq, self.block_size
        return sum(
            P if w is None else min(P, -(-(w + step_tokens) // G) + 1)
            for w in self.kv_group_windows
        )

    def _kv_budget(self, utilization: float, kv_bytes: int | None) -> int:
        if kv_bytes is not None:
            return int(kv_bytes)
        stats = None
        try:
            stats = jax.devices()[0].memory_stats()
        except Exception:  # backends without memory stats
            stats = None
        if not stats or "bytes_limit" not in stats:
            return _CPU_DEFAULT_KV_BYTES
        limit, used = stats["bytes_limit"], stats.get("bytes_in_use", 0)
        # leave headroom for activations of the largest bucket and the sampler
        reserve = 64 * self.max_num_batched_tokens * self.vocab_size // 16 + (512 << 20)
        return max(0, int(limit * utilization) - used - reserve)

    # -- the compiled step --------------------------------------------------------------------
    def _pad_rows(self, tokens: jax.Array) -> jax.Array:
        return jnp.zeros(self.max_rows, jnp.int32).at[: tokens.shape[0]].set(tokens)

    def _sample_fn(self, logits, t, extras=None, **static):
        tokens, lp, top_ids, top_lp = sample(logits, t, extras=extras, **static)
        return self._pad_rows(tokens.astype(jnp.int32)), lp, top_ids, top_lp

    @staticmethod
    def _write_rows_fn(cache, src, src_rows, dst_rows):
        """cache (R + 1, D) with cache[dst_rows[i]] = src[src_rows[i]]; padding entries write
        to the last row, which nothing reads."""
        return cache.at[dst_rows].set(src[src_rows].astype(cache.dtype))

    @staticmethod
    def _copy_state_fn(states, src, dst):
        return [a.at[dst].set(a[src]) for a in states]

    def copy_state(self, src: int, dst: int) -> None:
        """Hybrid models: every state array's slot `src` into slot `dst`, queued on the
        device after the steps already launched (one program for every pair)."""
        s = self._state_start
        self.kv_caches[s:] = self._copy_state(self.kv_caches[s:], np.int32(src), np.int32(dst))

    def _step_fn(self, leaves, kv_caches, prev_tokens, input_ids, md, *rest):
        if self.shard_attention:
            # the mesh, while tracing: attention runs under shard_map over its "model" axis
            with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
                return self._step_body(leaves, kv_caches, prev_tokens, input_ids, md, *rest)
        return self._step_body(leaves, kv_caches, prev_tokens, input_ids, md, *rest)

    def _step_body(
        self,
        leaves,
        kv_caches,
        prev_tokens,
        input_ids,
        md,
        mm_rows,
        seq_inputs,
        enc_cache,
        prompt_targets=None,
    ):
        params = jax.tree_util.tree_unflatten(self._param_treedef, leaves)
        model = nnx.merge(self.graphdef, params)
        # a negative id -(r + 1) stands for the token the previous step sampled in row r,
        # still on device (asynchronous scheduling)
        input_ids = jnp.where(input_ids < 0, prev_tokens[jnp.maximum(-input_ids - 1, 0)], input_ids)
        x = None
        kwargs = {"seq_inputs": seq_inputs} if seq_inputs is not None else {}
        if mm_rows is not None:  # encoder outputs over placeholder tokens
            x = model.embed(input_ids)
            D = x.shape[-1]
            picked = enc_cache[jnp.maximum(mm_rows, 0)].astype(x.dtype)  # (T, W)
            spliced = (mm_rows >= 0)[:, None]
            x = jnp.where(spliced, picked[:, :D], x)
            if picked.shape[-1] > D:  # the rest of a row goes to the model (DeepStack)
                kwargs["mm_extra"] = jnp.where(spliced, picked[:, D:], 0)
        hidden, kv_caches = model(input_ids, kv_caches, md, inputs_embeds=x, **kwargs)
        logits = model.compute_logits(hidden[md.logits_indices])
        # greedy tokens come with every step: an all-greedy batch skips the sampler program
        out = (logits, self._pad_rows(jnp.argmax(logits, axis=-1).astype(jnp.int32)))
        if prompt_targets is not None:  # a variant of its own: other steps pay nothing
            out += (prompt_logprobs(model.compute_logits, hidden, prompt_targets, MAX_LOGPROBS),)
        return kv_caches, out

    @staticmethod
    def _step_sig(arrays: StepArrays) -> tuple:
        """The step program a batch needs (cheap: read per step)."""
        si = arrays.seq_inputs
        return (
            len(arrays.input_ids),
            arrays.md.positions.ndim,
            arrays.mm_rows is None,
            None if si is None else tuple((k, np.shape(v)) for k, v in si.items()),
        )

    def bucket(self, num_tokens: int) -> tuple[int, int]:
        for T in self.token_buckets:
            if T >= num_tokens:
                return T, min(T, next_pow2(self.max_num_seqs))
        raise ValueError(f"{num_tokens} tokens exceed max_num_batched_tokens")

    @property
    def limits(self) -> ResolvedLimits:
        return ResolvedLimits(
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            num_pages=self.num_pages,
            block_size=self.block_size,
            encoder_cache_rows=self.encoder_cache_rows if self.encoder_cache is not None else 0,
            num_state_slots=self.num_state_slots,
            num_snapshot_slots=getattr(self, "num_snapshot_slots", 0),
            cross_slots=self.cross_slots,
            kv_group_windows=self.kv_group_windows,
        )

    def prepare(self, steps: list[SeqStep], min_tokens: int = 0):
        total = sum(len(s.token_ids) for s in steps)
        T, S = self.bucket(max(total, len(steps), min_tokens))
        ids = np.zeros(T, np.int32)
        # one program per bucket: M-RoPE models always take (3, T) positions, multimodal
        # models always take encoder cache rows (-1 where nothing is spliced)
        mrope = self.uses_mrope or any(s.mrope_positions is not None for s in steps)
        positions = np.zeros((3, T) if mrope else T, np.int32)
        kv_lens = np.zeros(S, np.int32)
        n_groups = len(self.kv_group_windows)
        if n_groups == 1:
            page_indices = np.zeros((S, self.pages_per_seq), np.int32)
        else:  # (groups, S, P): a windowed group's given-back entries read page 0 (masked)
            page_indices = np.zeros((n_groups, S, self.pages_per_seq), np.int32)
        cu = np.zeros(S + 1, np.int32)
        logits_indices = np.zeros(S, np.int32)
        mm_rows = np.full(T, -1, np.int32) if self.splices_embeds else None
        t = 0
        for i, s in enumerate(steps):
            n = len(s.token_ids)
            first = s.start + s.position_offset
            if n == 1:  # decodes: scalar stores, the per-step host cost at large batches
                ids[t] = s.token_ids[0]
                if s.mrope_positions is not None:
                    positions[:, t] = s.mrope_positions[:, 0]
                elif mrope:
                    positions[:, t] = first
                else:
                    positions[t] = first
            else:
                ids[t : t + n] = s.token_ids
                if s.mrope_positions is not None:
                    positions[:, t : t + n] = s.mrope_positions
                elif mrope:
                    positions[:, t : t + n] = np.arange(first, first + n)[None]
                else:
                    positions[t : t + n] = np.arange(first, first + n)
            kv_lens[i] = s.start + n
            if n_groups == 1:
                page_indices[i, : len(s.block_table)] = s.block_table
            else:
                self._group_rows(page_indices[:, i], s)
            cu[i + 1] = t + n
            logits_indices[i] = t + n - 1
            for off, rows in s.mm_rows or ():
                mm_rows[t + off : t + off + len(rows)] = rows
            t += n
        cu[len(steps) + 1 :] = t
        seq_inputs = None
        if any(s.seq_inputs for s in steps):
            seq_inputs = {}
            for name in next(s.seq_inputs for s in steps if s.seq_inputs):
                rows = [s.seq_inputs[name] for s in steps if s.seq_inputs]
                proto = np.asarray(rows[0])
                arr = np.zeros((S, *proto.shape), proto.dtype)
                for i, s in enumerate(steps):
                    if s.seq_inputs:
                        arr[i] = s.seq_inputs[name]
                seq_inputs[name] = arr
        if self.num_state_slots:  # every row names its state slot, padding the scratch one
            slot = np.full(S, self.state_scratch_slot, np.int32)
            for i, s in enumerate(steps):
                if s.state_slot is not None:
                    slot[i] = s.state_slot
            seq_inputs = {**(seq_inputs or {}), "state_slot": slot}
        md = AttentionMetadata(
            positions=positions,
            kv_lens=kv_lens,
            page_indices=page_indices,
            cu_q_lens=cu,
            num_seqs=np.array([len(steps)], np.int32),
            logits_indices=logits_indices,
        )
        return StepArrays(ids, md, mm_rows, seq_inputs), S

    def _group_rows(self, rows: np.ndarray, s: SeqStep) -> None:
        """One sequence's rows (groups, P) of a grouped page table."""
        if s.group_tables is None or len(s.group_tables) != len(rows) - 1:
            raise ValueError(
                f"this model pages its layers in {len(rows)} groups: the step needs a page "
                "table per group (SeqStep.group_tables, from the engine's block manager)"
            )
        rows[0, : len(s.block_table)] = s.block_table
        for g, table in enumerate(s.group_tables, start=1):
            rows[g, : len(table)] = np.maximum(table, 0)

    # -- the encoder stage ---------------------------------------------------------------------
    def encode(self, jobs: list[tuple[str, object, np.ndarray]]) -> None:
        """Run the encoders for these items and write their outputs into the encoder cache.

        jobs: (modality, host input, rows (n,) int32 of the encoder cache). The host input is
        what the front end prepared for the model's encoder (pixel or patch bytes, audio
        features: a dict), or a float (n, D) array of precomputed embeddings, copied as it is.
        Encoders are called once per modality with all its items (the model batches and
        buckets them); the writes are one program per source array shape.
        """
        if self.encoder_cache is None:
            raise ValueError("this model has no encoder cache")
        groups: dict[str, list[tuple[object, np.ndarray]]] = {}
        host: list[tuple[np.ndarray, np.ndarray]] = []
        for modality, inp, rows in jobs:
            if isinstance(inp, np.ndarray):
                host.append((inp, rows))
            else:
                groups.setdefault(modality, []).append((inp, rows))
        # source array -> (array, source rows, destination rows)
        writes: dict[int, tuple[jax.Array, list, list]] = {}
        for modality, group in groups.items():
            if self._mm_encode is None:
                self._mm_encode = self.model_obj.mm_encoder(self.graphdef)
            feats = self._mm_encode(self.params, modality, [inp for inp, _ in group])
            for f, (_, rows) in zip(feats, group, strict=True):
                if len(f) != len(rows):
                    raise RuntimeError(
                        f"the {modality} encoder gave {len(f)} rows for an item that takes "
                        f"{len(rows)}"
                    )
                _, src, dst = writes.setdefault(id(f.array), (f.array, [], []))
                src.append(np.arange(f.start, f.stop, dtype=np.int32))
                dst.append(rows)
        if host:  # precomputed embeddings: one upload, padded to a power of two of rows
            n = sum(len(e) for e, _ in host)
            buf = np.zeros((max(next_pow2(n), MIN_BUCKET), self.mm_row_width), self.dtype)
            buf[:n] = np.concatenate([e for e, _ in host])
            array = jax.device_put(buf, NamedSharding(self.mesh, PartitionSpec()))
            writes[id(array)] = (array, [np.arange(n, dtype=np.int32)], [r for _, r in host])
        trash = self.encoder_cache_rows
        for array, src, dst in writes.values():
            M = array.shape[0]  # index vectors as long as the source: one program per shape
            src_idx = np.zeros(M, np.int32)
            dst_idx = np.full(M, trash, np.int32)
            src_cat, dst_cat = np.concatenate(src), np.concatenate(dst)
            src_idx[: len(src_cat)] = src_cat
            dst_idx[: len(dst_cat)] = dst_cat
            self.encoder_cache = self._write_rows(self.encoder_cache, array, src_idx, dst_idx)

    def sync_encoder_cache(self) -> None:
        """Wait for the encoder stage's queued work (warmup, benchmarks)."""
        if self.encoder_cache is not None:
            jax.block_until_ready(self.encoder_cache)

    def encode_cross(self, features: np.ndarray, slots: list[int]) -> None:
        """Encoder-decoder models: encode (B, mel, frames) features and store each one's
        cross-attention K/V in its slot (the slabs travel, donated, after the KV pages)."""
        if self._cross_write is None:
            self._cross_write = self.model_obj.cross_kv_writer(self.graphdef)
        L = self.num_layers
        for i in range(0, len(slots), MAX_CROSS_BATCH):
            self.kv_caches[L:] = self._cross_write(
                self.params,
                self.kv_caches[L:],
                features[i : i + MAX_CROSS_BATCH],
                slots[i : i + MAX_CROSS_BATCH],
            )

    def logits(self, steps: list[SeqStep]) -> np.ndarray:
        """Run one step and return each sequence's last-token logits (S rows) without sampling."""
        arrays, _ = self.prepare(steps)
        self.kv_caches, (logits, _) = self.step_programs(
            self._step_sig(arrays),
            self._param_leaves,
            self.kv_caches,
            self._no_prev,
            *arrays,
            self.encoder_cache,
        )
        return np.asarray(logits)[: len(steps)]

    def execute(self, steps: list[SeqStep]) -> StepOutput:
        return self.resolve(self.dispatch(steps))

    def dispatch(
        self, steps: list[SeqStep], prev: InFlight | None = None, fill_masks=None
    ) -> InFlight:
        """Launch one step (and its sampler) without waiting for the device.

        Token ids -(r + 1) in `steps` are read from row r of `prev`'s sampled tokens on
        device, so the engine can schedule step N+1 before step N's tokens reach the host.
        `fill_masks(bitmask)`: fills the grammar bitmask rows `(S, ceil(V / 32))` int32 (all
        ones: unconstrained) of the constrained sequences; it runs on the host after the
        model's step is launched, so the masks are computed while the device works.
        """
        arrays, S = self.prepare(steps)
        prev_tokens = self._no_prev if prev is None else prev.tokens
        targets = self._prompt_targets(steps, len(arrays.input_ids))
        sig = self._step_sig(arrays)
        self.kv_caches, (logits, greedy_tokens, *plp) = self.step_programs(
            sig if targets is None else (*sig, "prompt_logprobs"),
            self._param_leaves,
            self.kv_caches,
            prev_tokens,
            *arrays,
            self.encoder_cache,
            *(() if targets is None else (targets,)),
        )
        plp = plp[0] if plp else None
        sampled = [s for s in steps if s.sample]
        rows = np.array([i for i, s in enumerate(steps) if s.sample], np.int64)
        if not sampled:
            return InFlight(greedy_tokens, rows, prompt=plp)
        penalties = any(
            s.presence != 0 or s.frequency != 0 or s.repetition != 1.0 or s.banned_ids
            for s in sampled
        )
        want_lp = [s.num_logprobs for s in sampled if s.num_logprobs is not None]
        bias = any(s.logit_bias for s in sampled)
        masked = fill_masks is not None
        plain = not penalties and not want_lp and not bias and not masked
        if plain and all(s.temperature == 0 for s in sampled):
            # greedy fast path: one program and one transfer per step
            return InFlight(greedy_tokens, rows, prompt=plp)
        # the sampled token's logprob and the MAX_LOGPROBS most likely are always computed
        # (a top-k of the row, cheap next to the model), and greedy rows ignore top-k/top-p:
        # the variants warmup compiles serve every logprobs value and filter setting
        all_greedy = all(s.temperature == 0 for s in sampled)
        t = sampling_tensors(steps, S, penalties, MIN_BUCKET)
        static = dict(
            all_greedy=all_greedy,
            use_filters=not all_greedy
            and any(s.top_k > 0 or s.top_p < 1 or s.min_p > 0 for s in sampled),
            use_penalties=penalties,
            num_logprobs=MAX_LOGPROBS,
        )
        extras = self._logits_extras(steps, S, bias, fill_masks)
        # penalty tensors vary in shape: those variants stay with jit
        sig = None if penalties else (S, *sorted(static.items()))
        if sig is not None and extras is not None:  # variants of their own, on first use
            sig = (*sig, "logit_bias" if bias else "", "masked" if masked else "")
        tokens, lp, top_ids, top_lp = self.sample_programs(sig, logits, t, extras, **static)
        if not want_lp:
            return InFlight(tokens, rows, prompt=plp)
        top = None if top_ids is None else (top_ids, top_lp)
        return InFlight(tokens, rows, lp, top, prompt=plp)

    @staticmethod
    def _prompt_targets(steps: list[SeqStep], T: int) -> np.ndarray | None:
        """(T,) the prompt token after each of the step's tokens, -1 where not wanted; None
        when no sequence asks for prompt logprobs."""
        if not any(s.prompt_targets for s in steps):
            return None
        targets = np.full(T, -1, np.int32)
        t = 0
        for s in steps:
            if s.prompt_targets:
                targets[t : t + len(s.prompt_targets)] = s.prompt_targets
            t += len(s.token_ids)
        return targets

    def _logits_extras(self, steps: list[SeqStep], S: int, bias: bool, fill_masks):
        """Fixed-shape logit bias table and grammar bitmask (None when neither is used)."""
        if not bias and fill_masks is None:
            return None
        extras = LogitsExtras()
        if bias:
            ids = np.full((S, MAX_LOGIT_BIAS), -1, np.int32)
            values = np.zeros((S, MAX_LOGIT_BIAS), np.float32)
            for i, s in enumerate(steps):
                if s.sample and s.logit_bias:
                    ids[i, : len(s.logit_bias)] = list(s.logit_bias)
                    values[i, : len(s.logit_bias)] = list(s.logit_bias.values())
            extras.bias_ids, extras.bias_values = ids, values
        if fill_masks is not None:
            bitmask = np.full((S, -(-self.vocab_size // 32)), -1, np.int32)
            fill_masks(bitmask)
            extras.bitmask = bitmask
        return extras

    def resolve(self, inflight: InFlight) -> StepOutput:
        """Wait for a dispatched step and bring its sampled tokens (and logprobs) to the host."""
        rows = inflight.rows
        prompt = None if inflight.prompt is None else tuple(np.asarray(a) for a in inflight.prompt)
        if not len(rows):
            return StepOutput(np.zeros(0, np.int32), None, None, None, None, prompt)
        lp, top = inflight.logprobs, inflight.top
        return StepOutput(
            np.asarray(inflight.tokens)[rows],
            None if lp is None else np.asarray(lp[0])[rows],
            None if lp is None else np.asarray(lp[1])[rows],
            None if top is None else np.asarray(top[0])[rows],
            None if top is None else np.asarray(top[1])[rows],
            prompt,
        )

    # -- warmup and the compile guard ---------------------------------------------------------
    def warmup(self) -> None:
        """Compile every token bucket's step and the common sampler variants.

        Each bucket is reached with an all-padding batch built by `prepare`, so the warm
        programs have exactly the signatures serving uses.
        """
        t0 = time.perf_counter()
        t_steps = 0.0
        for T in progress.bar(self.token_buckets, desc="Compiling token buckets", unit="bucket"):
            arrays, S = self.prepare([], min_tokens=T)
            t1 = time.perf_counter()
            sig = self._step_sig(arrays)
            args = (self._param_leaves, self.kv_caches, self._no_prev, *arrays, self.encoder_cache)
            self.step_programs.prepare(sig, args)
            self.kv_caches, (logits, _) = self.step_programs(sig, *args)
            jax.block_until_ready(logits)
            t_steps += time.perf_counter() - t1
            t = sampling_tensors([], S, False, MIN_BUCKET)
            for greedy, filters in ((True, False), (False, False), (False, True)):
                static = dict(
                    all_greedy=greedy,
                    use_filters=filters,
                    use_penalties=False,
                    num_logprobs=MAX_LOGPROBS,
                )
                sig = (S, *sorted(static.items()))
                if sig not in self.sample_programs.programs:
                    self.sample_programs.prepare(sig, (logits, t, None), static)
                out = self.sample_programs(sig, logits, t, None, **static)
            jax.block_until_ready(out)
        if self.num_state_slots:  # the prefix-cache snapshot copy
            self.copy_state(self.state_scratch_slot, self.state_scratch_slot)
        self.init_times["warmup"] = round(time.perf_counter() - t0, 3)
        self.init_times["warmup_steps"] = round(t_steps, 3)
        self.init_times["programs_from_disk"] = (
            self.step_programs.sources["disk"] + self.sample_programs.sources["disk"]
        )
        progress.note(
            "warmup: compiled %d token buckets in %.1f s",
            len(self.token_buckets),
            self.init_times["warmup"],
        )
        logger.info("start-up times (s): %s", self.init_times)

    def num_compiled(self) -> int:
        """Programs traced for this runner (step, sampler and splice variants)."""
        return (
            self._step._cache_size()
            + self._sample._cache_size()
            + self._write_rows._cache_size()
            + self._copy_state._cache_size()
            + len(self.step_programs)
            + len(self.sample_programs)
        )


def _config_fingerprint(hf_config) -> str:
    """The checkpoint config as sorted JSON: part of every saved program's key."""
    to_dict = getattr(hf_config, "to_dict", None)
    d = to_dict() if callable(to_dict) else dict(vars(hf_config))
    return json.dumps(d, sort_keys=True, default=str)
