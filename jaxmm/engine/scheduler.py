"""The scheduler: which sequences run in the next step, and how many tokens each.

Plain Python, no JAX. Each step has a token budget (`max_num_batched_tokens`):
1. Running sequences first, in arrival order: a decode takes one token, an unfinished
   prefill takes the next chunk that fits the budget (chunked prefill). When pages run out,
   the most recently admitted running sequence is preempted: its pages are freed and it
   goes back to the front of the waiting queue, to be recomputed later.
2. Then waiting sequences, in order, while budget, `max_num_seqs` and pages allow; each
   starts from its longest cached prefix.
The step's batch lists decodes first, then prefill chunks (the attention contract's order).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, block_manager: BlockManager):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self, exclude: set[int] | frozenset = frozenset()) -> ScheduledBatch:
        """The next step's batch. `exclude`: seq_ids of running sequences to leave out
        (their in-flight token is known to be their last)."""
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch()

        # 1. running sequences (decodes and unfinished prefill chunks)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.seq_id in exclude:
                i += 1
                continue
            n = min(seq.num_uncomputed, budget)
            scheduled = True
            while not bm.ensure_slots(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()  # lowest priority: admitted last
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    scheduled = False
                    break
            if not scheduled:
                break
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1

        # 2. waiting sequences, unless this step had to preempt
        while (
            self.waiting
            and not batch.preempted
            and budget > 0
            and len(self.running) < self.max_num_seqs
        ):
            seq = self.waiting[0]
            if seq.token_ids[-1] < 0:
                break  # preempted while its last token is in flight: admit it next step
            if not seq.block_table:
                bm.admit(seq)
            n = min(seq.num_uncomputed, budget)
            if not bm.ensure_slots(seq, seq.num_computed_tokens + n):
                bm.free_seq(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n

        # decodes first, then prefill chunks (stable)
        order = sorted(range(len(batch.seqs)), key=lambda j: batch.num_new_tokens[j] != 1)
        batch.seqs = [batch.seqs[j] for j in order]
        batch.num_new_tokens = [batch.num_new_tokens[j] for j in order]
        return batch

    def postprocess(self, batch: ScheduledBatch) -> list[Sequence]:
        """Advance computed counts; returns the sequences whose next token was sampled."""
        sampled = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
            if seq.num_computed_tokens == len(seq):
                sampled.append(seq)
        return sampled

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.block_manager.free_seq(seq)
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass

    def abort(self, request_ids: set[str]) -> list[Sequence]:
        aborted = [
            s for s in list(self.running) + list(self.waiting) if s.request_id in request_ids
        ]
        for seq in aborted:
            self.finish(seq, "abort")
        return aborted
