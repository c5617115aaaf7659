"""The scheduler: which sequences run in the next step, and how many tokens each.

Plain Python, no JAX. Each step has a token budget (`max_num_batched_tokens`):
1. Running sequences first, in arrival order: a decode takes one token, an unfinished
   prefill takes the next chunk that fits the budget (chunked prefill). When pages run out,
   the most recently admitted running sequence is preempted: its pages are freed and it
   goes back to the front of the waiting queue, to be recomputed later.
2. Then waiting sequences, in order, while budget, `max_num_seqs` and pages allow; each
   starts from its longest cached prefix.
The step's batch lists decodes first, then prefill chunks (the attention contract's order).

Encoder work (multimodal models) has a budget of its own, in encoder output rows per step
(vLLM's encoder compute budget). A prefill chunk that covers an item (image, video, audio)
whose output is not in the encoder cache schedules the item's encoder run in this step and
allocates its rows (`EncoderCacheManager`); when the encoder budget or the cache is spent,
the chunk stops before the item and goes on next step. An item found in the cache (a
repeated image, or another sequence's) runs no encoder; a chunk that a cached prefix
already covers needs no item at all. The first item of a step may exceed the budget alone,
so an item larger than the budget still runs.

With `whole_mm_items` (models whose items attend to themselves both ways, Gemma 3's images:
the model's `mm_whole_items`) a prefill chunk never ends inside an item: it stops before
the item, or, when the item is where the chunk starts, waits for a step with room for all of
it. An item longer than `max_num_batched_tokens` cannot be whole; it is split as before.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .encoder_cache import EncoderCacheManager
from .sequence import Sequence, SequenceStatus
from .state_cache import StateSlots, snapshot_point


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # items whose encoder runs before this step: (sequence, key), rows already allocated
    encoder_items: list[tuple[Sequence, str]] = field(default_factory=list)
    encoder_rows: int = 0

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        block_manager: BlockManager,
        encoder_cache: EncoderCacheManager | None = None,
        encoder_budget: int | None = None,
        state_slots: StateSlots | None = None,
        whole_mm_items: bool = False,
    ):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_manager = block_manager
        self.encoder_cache = encoder_cache
        self.encoder_budget = encoder_budget or max_num_batched_tokens
        self.whole_mm_items = whole_mm_items
        # hybrid models: a sequence runs only while it holds a state slot (state_cache.py)
        self.state_slots = state_slots
        # encoder cache keys each sequence holds (until its prefill has passed them)
        self._held: dict[int, set[str]] = {}
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
        if self.state_slots is not None:  # recomputed from its first token: state too
            self.state_slots.free(seq.seq_id)
        self.release_items(seq)
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
            n = self._cut_at_snapshot(
                seq, self._fit_encoder(seq, min(seq.num_uncomputed, budget), batch)
            )
            if n == 0:  # its next item's encoder waits for budget or cache room
                i += 1
                continue
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
            if self.state_slots is not None and not self.state_slots.can_allocate(seq.seq_id):
                break  # admitted against free state slots as well as pages
            if not seq.block_table:
                bm.admit(seq)
            n = self._cut_at_snapshot(
                seq, self._fit_encoder(seq, min(seq.num_uncomputed, budget), batch)
            )
            if n == 0 or not bm.ensure_slots(seq, seq.num_computed_tokens + n):
                bm.free_seq(seq)
                self.release_items(seq)
                break
            self.waiting.popleft()
            if self.state_slots is not None:
                self.state_slots.allocate(seq.seq_id)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n

        if batch.encoder_items:  # only items a scheduled sequence still holds
            scheduled = {s.seq_id: s for s in batch.seqs}
            keep = []
            for _, key in batch.encoder_items:
                entry = self.encoder_cache.entries.get(key)
                owner = (
                    None
                    if entry is None
                    else next((scheduled[o] for o in entry.owners if o in scheduled), None)
                )
                if owner is not None:
                    keep.append((owner, key))
            batch.encoder_items = keep
            batch.encoder_rows = sum(
                self.encoder_cache.entries[k].num_rows for _, k in batch.encoder_items
            )

        # decodes first, then prefill chunks (stable)
        order = sorted(range(len(batch.seqs)), key=lambda j: batch.num_new_tokens[j] != 1)
        batch.seqs = [batch.seqs[j] for j in order]
        batch.num_new_tokens = [batch.num_new_tokens[j] for j in order]
        return batch

    def _cut_at_snapshot(self, seq: Sequence, n: int) -> int:
        """Hybrid models with prefix caching: a prefill chunk that passes the prompt's
        snapshot point ends there, so the engine can keep the state at that prefix."""
        bm = self.block_manager
        if self.state_slots is None or bm.has_state_snapshot is None:
            return n
        if not bm.enable_prefix_caching:
            return n
        cut = snapshot_point(seq.num_prompt_tokens, bm.block_size)
        start = seq.num_computed_tokens
        return cut - start if start < cut < start + n else n

    # -- encoder work ---------------------------------------------------------------------------
    def _fit_encoder(self, seq: Sequence, n: int, batch: ScheduledBatch) -> int:
        """The chunk's length once every item it covers has encoder rows: items in the cache
        are taken as they are, others are allocated and queued for this step's encoder run
        while the encoder budget and the cache allow; the chunk stops before the first item
        that does not fit."""
        cache = self.encoder_cache
        if not seq.mm_spans or cache is None:
            return n
        start = seq.num_computed_tokens
        if self.whole_mm_items:
            n = self._whole_items(seq, start, n)
            if n == 0:
                return 0
        held = self._held.setdefault(seq.seq_id, set())
        queued = {k for _, k in batch.encoder_items}
        for lo, hi, key in seq.mm_spans:
            if hi <= start:
                continue
            if lo >= start + n:
                break
            entry = cache.get(key)
            if entry is None or (not entry.ready and key not in queued):
                rows = hi - lo
                over = batch.encoder_rows and batch.encoder_rows + rows > self.encoder_budget
                if over or (entry is None and not cache.can_allocate(rows)):
                    return max(lo - start, 0)
                if entry is None:
                    entry = cache.allocate(key, rows, seq.seq_id)
                batch.encoder_items.append((seq, key))
                batch.encoder_rows += rows
                queued.add(key)
            if key not in held:
                if seq.seq_id not in entry.owners:
                    cache.acquire(key, seq.seq_id)
                held.add(key)
        return n

    def _whole_items(self, seq: Sequence, start: int, n: int) -> int:
        """The chunk [start, start + n) cut so that it does not end inside an item."""
        for lo, hi, _ in seq.mm_spans:
            if lo < start + n < hi:
                if lo > start:
                    return lo - start  # stop before the item
                if hi - start <= self.max_num_batched_tokens:
                    return 0  # the item starts the chunk: wait for a step with room for it
                return n  # longer than any step: split after all
        return n

    def release_items(self, seq: Sequence, upto: int | None = None) -> None:
        """Drop the sequence's hold on the items its prefill has passed (all with None)."""
        held = self._held.get(seq.seq_id)
        if not held or self.encoder_cache is None:
            return
        for _, hi, key in seq.mm_spans:
            if key in held and (upto is None or hi <= upto):
                self.encoder_cache.release(key, seq.seq_id)
                held.discard(key)
        if not held:
            self._held.pop(seq.seq_id, None)

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
        self.release_items(seq)
        if self.state_slots is not None:
            self.state_slots.free(seq.seq_id)
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
