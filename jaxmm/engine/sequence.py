"""A sequence: one stream of tokens being generated (a request with n>1 owns n of them).

Plain Python, no JAX. States: WAITING -> RUNNING -> FINISHED (RUNNING -> WAITING on
preemption, which frees the pages and recomputes them later).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt + generated so far
    num_prompt_tokens: int
    index: int = 0  # which of the request's n completions
    # content keys that make otherwise-equal token pages differ (multimodal item hashes),
    # as (start, end, key) spans over token positions
    extra_keys: tuple[tuple[int, int, str], ...] = ()
    # multimodal items whose encoder output replaces prompt positions [start, end), as
    # (start, end, key) in prompt order: the scheduler gets their encoder work done first
    mm_spans: tuple[tuple[int, int, str], ...] = ()
    seq_id: int = field(default_factory=lambda: next(_counter))
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    # models with page groups (block_manager.py): the tables of groups 1.. (windowed layers)
    group_tables: list[list[int]] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hits at the last admission
    num_hashed_blocks: int = 0  # leading full pages already registered in the prefix cache
    block_hashes: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # opaque per-sequence state the engine keeps (detokenizer, logprobs...)
    data: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def resolved_output_ids(self) -> list[int]:
        """Output ids without a trailing in-flight placeholder (negative id)."""
        ids, end = self.token_ids, len(self.token_ids)
        while end > self.num_prompt_tokens and ids[end - 1] < 0:
            end -= 1
        return ids[self.num_prompt_tokens : end]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def num_blocks(self, block_size: int) -> int:
        return (len(self.token_ids) + block_size - 1) // block_size

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size : (i + 1) * block_size]
