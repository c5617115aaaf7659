"""Per-sequence state slots for hybrid (linear-attention) models. Plain Python, no JAX.

A linear-attention layer keeps, per sequence, a fixed-size recurrent state and a short
convolution state instead of KV pages. The runner holds them as arrays `(slots + 1, ...)`,
one per linear layer and kind (the last slot is scratch that padding rows write to); this
module only decides which slot each sequence owns:

1. A sequence takes a slot when the scheduler admits it and keeps it while it runs,
   through every chunk of its prefill (the state carries from chunk to chunk).
2. Finishing or preemption frees it; a preempted sequence recomputes from its first token,
   so its state is rebuilt, never restored.
3. A slot needs no clearing when it changes hands: a sequence whose step starts at
   position 0 reads a zero state whatever the slot holds (the kernels' `has_state`).
4. Each of a request's n sequences owns its own slot from the start (the engine makes n
   independent sequences, so the "fork" copies nothing: each computes its prompt's state).

Prefix caching: KV pages can be shared at any page boundary, but a linear layer's state
at that point is gone once the sequence moved on. So hybrid models keep state snapshots
(`StateSnapshots`, extra slots of the same arrays, least recently used first out):
5. For a prompt whose prefill passes a page boundary, the scheduler ends a chunk at its
   last page boundary before the final token, A = floor((len - 1) / G) * G, and the engine
   copies the sequence's state there into a snapshot slot keyed by the hash of the prefix's
   last page (the prefix cache's own hash chain).
6. A new sequence takes a prefix-cache hit only up to the longest cached prefix whose
   state snapshot exists (a cached prefix without one counts for nothing: never a wrong
   answer); its first step starts from a copy of that snapshot in its own slot.
A snapshot costs one slot's bytes (Qwen3.5-9B: about 51 MB), so repeated prompts and shared
system prompts are what it is for; unique prompts pay one extra chunk boundary.
"""

from __future__ import annotations

from collections import OrderedDict


class StateSlots:
    """Which sequence owns which of `num_slots` state slots."""

    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out low ids first
        self._owner: dict[int, int] = {}  # seq_id -> slot

    @property
    def spare(self) -> int:
        """The scratch slot that padding rows of a step read and write."""
        return self.num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_slots

    def slot_of(self, seq_id: int) -> int | None:
        return self._owner.get(seq_id)

    def can_allocate(self, seq_id: int) -> bool:
        return seq_id in self._owner or bool(self._free)

    def allocate(self, seq_id: int) -> int:
        """The sequence's slot, taking a free one on first call; raises when none is free."""
        slot = self._owner.get(seq_id)
        if slot is None:
            if not self._free:
                raise RuntimeError("no free state slot")
            slot = self._owner[seq_id] = self._free.pop()
        return slot

    def free(self, seq_id: int) -> None:
        slot = self._owner.pop(seq_id, None)
        if slot is not None:
            self._free.append(slot)


class StateSnapshots:
    """Snapshot slots `first .. first + count - 1`, keyed by a prefix's last page hash."""

    def __init__(self, first: int, count: int):
        self.first, self.count = first, count
        self._by_hash: OrderedDict[int, int] = OrderedDict()  # least recently used first
        self._free = list(range(first + count - 1, first - 1, -1))

    def __len__(self) -> int:
        return len(self._by_hash)

    def get(self, page_hash: int) -> int | None:
        """The snapshot's slot (now most recently used), or None."""
        slot = self._by_hash.get(page_hash)
        if slot is not None:
            self._by_hash.move_to_end(page_hash)
        return slot

    def has(self, page_hash: int) -> bool:
        return page_hash in self._by_hash

    def put(self, page_hash: int) -> int:
        """The slot to write this prefix's snapshot into: its own, a free one, or the least
        recently used one's (which is forgotten)."""
        slot = self.get(page_hash)
        if slot is None:
            slot = self._free.pop() if self._free else self._by_hash.popitem(last=False)[1]
            self._by_hash[page_hash] = slot
        return slot

    def clear(self) -> None:
        self._free += list(self._by_hash.values())
        self._by_hash.clear()


def snapshot_point(num_prompt_tokens: int, block_size: int) -> int:
    """Where a prompt's state is snapshotted: its last page boundary before the final token
    (0: the prompt fills no page before it, no snapshot)."""
    return (num_prompt_tokens - 1) // block_size * block_size
