"""Which rows of the runner's encoder cache hold which multimodal item. Plain Python, no JAX.

The runner keeps one device array of encoder outputs, `(R + 1, D)`: R rows handed out in
blocks, and a last row that padded writes land on. An item (an image, a video, an audio
clip, or precomputed embeddings) is keyed by its content hash or `multi_modal_uuids` entry
and holds the rows of its blocks, in order; the step splices rows by index, so an item's
blocks need not be contiguous and the cache never fragments.

Lifetime. The scheduler allocates an item's rows in the step whose prefill chunk first
needs it, and the engine runs its encoder before launching that step. Each sequence that
will read the item holds a reference from then until its prefill has passed the item; an
item nobody references stays cached (least recently used first out) for later requests
with the same key, so a repeated image skips its encoder. A preempted sequence whose item
was evicted meanwhile simply encodes it again: requests keep their host inputs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CachedItem:
    key: str
    num_rows: int
    blocks: list[int]
    rows: np.ndarray  # (num_rows,) int32 row indices into the device array
    owners: set = field(default_factory=set)
    ready: bool = False  # the encoder output has been written


class EncoderCacheManager:
    def __init__(self, num_rows: int, block_rows: int = 16):
        if num_rows < block_rows:
            raise ValueError(f"the encoder cache needs >= {block_rows} rows, got {num_rows}")
        self.block_rows = block_rows
        self.num_blocks = num_rows // block_rows
        self.num_rows = self.num_blocks * block_rows
        self.free_blocks: list[int] = list(range(self.num_blocks - 1, -1, -1))
        # every entry, least recently used first; unreferenced ones can be evicted
        self.entries: OrderedDict[str, CachedItem] = OrderedDict()
        self.hits = 0
        self.misses = 0

    # -- queries ----------------------------------------------------------------------------
    def blocks_for(self, num_rows: int) -> int:
        return -(-num_rows // self.block_rows)

    def get(self, key: str) -> CachedItem | None:
        item = self.entries.get(key)
        if item is not None:
            self.entries.move_to_end(key)
        return item

    def evictable_blocks(self) -> int:
        return sum(len(e.blocks) for e in self.entries.values() if not e.owners)

    def can_allocate(self, num_rows: int) -> bool:
        need = self.blocks_for(num_rows)
        return need <= len(self.free_blocks) + self.evictable_blocks()

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_blocks) / self.num_blocks

    # -- changes ----------------------------------------------------------------------------
    def allocate(self, key: str, num_rows: int, owner) -> CachedItem:
        """Rows for a new item (evicting unreferenced items, oldest first), held by owner."""
        if key in self.entries:
            raise KeyError(f"encoder cache already holds {key!r}")
        need = self.blocks_for(num_rows)
        if need > self.num_blocks:
            raise ValueError(
                f"an item of {num_rows} encoder rows exceeds the encoder cache "
                f"({self.num_rows} rows)"
            )
        for old_key in [k for k, e in self.entries.items() if not e.owners]:
            if len(self.free_blocks) >= need:
                break
            self.free_blocks.extend(self.entries.pop(old_key).blocks)
        if len(self.free_blocks) < need:
            raise RuntimeError("encoder cache full: check can_allocate() first")
        blocks = [self.free_blocks.pop() for _ in range(need)]
        b = self.block_rows
        rows = (np.asarray(blocks, np.int32)[:, None] * b + np.arange(b, dtype=np.int32)).ravel()
        item = CachedItem(key, num_rows, blocks, rows[:num_rows], {owner})
        self.entries[key] = item
        self.misses += 1
        return item

    def acquire(self, key: str, owner) -> CachedItem:
        item = self.entries[key]
        item.owners.add(owner)
        self.entries.move_to_end(key)
        self.hits += 1
        return item

    def release(self, key: str, owner) -> None:
        item = self.entries.get(key)
        if item is not None:
            item.owners.discard(owner)
            if not item.ready and not item.owners:  # never written: nothing worth keeping
                self.free_blocks.extend(self.entries.pop(key).blocks)

    def reset(self) -> None:
        """Forget every unreferenced item (vLLM's `reset_mm_cache`)."""
        for key in [k for k, e in self.entries.items() if not e.owners]:
            self.free_blocks.extend(self.entries.pop(key).blocks)
