"""The front end's cache of prepared items, by content hash or user uuid, LRU bounded by bytes.

Plain Python. An entry is what the engine needs to place and encode an item without
preparing it again: the host input of the model's encoder (processed pixels or patch bytes,
audio features, or precomputed embeddings), its number of feature rows, and the grid
metadata M-RoPE positions are computed from. A prompt may send an item as `None` with a
uuid it sent before; that item is served from here, and a miss (never seen, or evicted) is
a clear error. The encoder outputs themselves live on the device, in the runner's encoder
cache (`jaxmm.engine.encoder_cache`); this cache holds host memory only
(`JAXMM_MM_CACHE_BYTES`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field

DEFAULT_CAPACITY_BYTES = 512 << 20


@dataclass(frozen=True)
class EncoderOutput:
    """A prepared item: the encoder's host input and the rows the encoder will give."""

    modality: str  # "image" | "video" | "audio"
    data: object  # the encoder's input (a dict), or precomputed (n, D) float embeddings
    num_rows: int  # feature rows: the item's number of placeholder tokens
    meta: dict = field(default_factory=dict)  # grid_thw, second_per_grid_t (M-RoPE models)

    @property
    def nbytes(self) -> int:
        return host_nbytes(self.data)


def host_nbytes(x) -> int:
    """Bytes of the host arrays in x (arrays, dicts and sequences of them, `.nbytes` holders)."""
    if isinstance(x, dict):
        return sum(host_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(host_nbytes(v) for v in x)
    n = getattr(x, "nbytes", None)
    if isinstance(n, int):
        return n
    data = getattr(x, "data", None)  # e.g. fast_image.PatchBytes
    return host_nbytes(data) if data is not None and data is not x else 0


def default_capacity() -> int:
    value = os.environ.get("JAXMM_MM_CACHE_BYTES", "").strip()
    return int(value) if value else DEFAULT_CAPACITY_BYTES


class EncoderCache:
    def __init__(self, capacity_bytes: int | None = None):
        self.capacity = default_capacity() if capacity_bytes is None else int(capacity_bytes)
        if self.capacity < 0:
            raise ValueError(f"the encoder cache capacity must be >= 0, got {self.capacity}")
        self._entries: OrderedDict[str, EncoderOutput] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> EncoderOutput | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)  # most recently used
        self.hits += 1
        return entry

    def put(self, key: str, entry: EncoderOutput) -> None:
        if key in self._entries:
            self.nbytes -= self._entries.pop(key).nbytes
        if entry.nbytes > self.capacity:
            return  # larger than the whole cache: used by its request, never kept
        self._entries[key] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.capacity:
            _, old = self._entries.popitem(last=False)  # least recently used
            self.nbytes -= old.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
