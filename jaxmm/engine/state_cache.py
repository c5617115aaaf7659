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
at that point is gone once the sequence moved on. The block manager therefore gives a
hybrid model no cache hit unless a state snapshot for that prefix exists; none are kept
yet, so hybrid models recompute every prompt from its first token (correct, and as fast as
caching off). Snapshots at page-aligned points would cost one slot's bytes (the runner's
`state_bytes_per_slot`) per cached prefix.
"""

from __future__ import annotations


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
