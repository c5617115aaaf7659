"""What one step carries between the engine and the runner: a sequence's part of the step
(`SeqStep`), the padded device inputs (`StepArrays`), a launched step (`InFlight`), its
host-side results (`StepOutput`), and the limits the runner resolved (`ResolvedLimits`)."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import numpy as np

from jaxmm.layers.attention import AttentionMetadata
from jaxmm.layers.sampler import SamplingTensors


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


@dataclasses.dataclass
class SeqStep:
    """One sequence's share of a step, as the engine hands it to the runner."""

    token_ids: list[int]  # this step's new tokens
    start: int  # position of the first of them
    block_table: list[int]
    sample: bool  # whether this step completes the sequence's context (sample a token)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    output_pos: int = 0
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    prompt_ids: list[int] | None = None  # penalties only
    output_ids: list[int] | None = None
    num_logprobs: int | None = None
    banned_ids: list[int] | None = None  # e.g. EOS/stop ids while min_tokens is not reached
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    # prompt logprobs: per new token, the prompt token that follows it (-1: none wanted)
    prompt_targets: list[int] | None = None
    # multimodal: (offset in token_ids, (n,) rows of the encoder cache) to splice over
    # placeholder tokens
    mm_rows: list | None = None
    mrope_positions: np.ndarray | None = None  # (3, n) for M-RoPE models
    # without mrope_positions, token i sits at start + i + position_offset (on every M-RoPE
    # axis): M-RoPE text after the prompt, without building a (3, n) array per token
    position_offset: int = 0
    # model-specific per-sequence inputs (name -> array), stacked to (S, ...) for the step,
    # e.g. an encoder-decoder's cross-attention slot
    seq_inputs: dict | None = None
    state_slot: int | None = None  # hybrid models: the sequence's state slot
    # models with page groups (sliding-window layers): the tables of groups 1.., entries
    # < 0 where a page was given back (block_manager.py)
    group_tables: list[list[int]] | None = None


class StepArrays(NamedTuple):
    """One step's device inputs, padded to its bucket (the jitted step's arguments)."""

    input_ids: np.ndarray  # (T,)
    md: AttentionMetadata
    mm_rows: np.ndarray | None  # (T,) encoder cache row per token, -1: none (multimodal)
    seq_inputs: dict | None  # model-specific (S, ...) arrays


@dataclasses.dataclass
class InFlight:
    """A dispatched step whose results are still on device (see `dispatch`)."""

    tokens: jax.Array  # (R,) sampled token per row, padded to the largest row count
    rows: np.ndarray  # rows of the steps that sample, in order
    logprobs: tuple | None = None
    top: tuple | None = None
    # prompt logprobs of the step's tokens: (lp (T,), rank (T,), top ids, top lps (T, 20))
    prompt: tuple | None = None


@dataclasses.dataclass
class StepOutput:
    tokens: np.ndarray  # (num sampled,) in the order of sampled steps
    logprobs: np.ndarray | None
    ranks: np.ndarray | None
    top_ids: np.ndarray | None
    top_logprobs: np.ndarray | None
    prompt: tuple | None = None  # InFlight.prompt on the host


@dataclasses.dataclass(frozen=True)
class ResolvedLimits:
    """What the runner made of the engine's configs on this device and model: the limits
    the engine sizes its scheduler, block manager and caches by (nothing else is read back
    from the runner for that)."""

    max_model_len: int
    max_num_seqs: int  # lowered to the cross-attention slots of an encoder-decoder model
    max_num_batched_tokens: int
    num_pages: int  # KV pages that fit the memory budget
    block_size: int
    encoder_cache_rows: int  # 0: the model has no encoder cache
    num_state_slots: int  # hybrid models: per-sequence state slots (0: none)
    num_snapshot_slots: int  # hybrid models: prefix-cache state snapshots
    cross_slots: int  # encoder-decoder models: cross-attention K/V slots
    # one sliding window (or None) per page group: (None,) for a model with one page table
    kv_group_windows: tuple[int | None, ...] = (None,)


def sampling_tensors(
    steps: list[SeqStep], S: int, penalties: bool, min_len: int
) -> SamplingTensors:
    """The sampler's per-row inputs of a step padded to S rows; with penalties, each row's
    prompt and output ids padded to a power of two of at least `min_len`."""

    def col(name, dtype, default):
        a = np.full(S, default, dtype)
        a[: len(steps)] = [getattr(s, name) for s in steps]
        return a

    L = 1
    seen = np.full((S, 1), -1, np.int32)
    is_out = np.zeros((S, 1), bool)
    banned = np.full((S, 1), -1, np.int32)
    if penalties:
        B = next_pow2(max(len(s.banned_ids or []) for s in steps))
        banned = np.full((S, B), -1, np.int32)
        for i, s in enumerate(steps):
            banned[i, : len(s.banned_ids or [])] = s.banned_ids or []
        L = next_pow2(max(len(s.prompt_ids or []) + len(s.output_ids or []) for s in steps))
        L = max(L, min_len)
        seen = np.full((S, L), -1, np.int32)
        is_out = np.zeros((S, L), bool)
        for i, s in enumerate(steps):
            p, o = s.prompt_ids or [], s.output_ids or []
            seen[i, : len(p)] = p
            seen[i, len(p) : len(p) + len(o)] = o
            is_out[i, len(p) : len(p) + len(o)] = True
    return SamplingTensors(
        temperature=col("temperature", np.float32, 0.0),
        top_k=col("top_k", np.int32, 0),
        top_p=col("top_p", np.float32, 1.0),
        min_p=col("min_p", np.float32, 0.0),
        seeds=col("seed", np.uint32, 0),
        steps=col("output_pos", np.int32, 0),
        presence=col("presence", np.float32, 0.0),
        frequency=col("frequency", np.float32, 0.0),
        repetition=col("repetition", np.float32, 1.0),
        seen_tokens=seen,
        seen_is_output=is_out,
        banned=banned,
    )
